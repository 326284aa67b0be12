"""The machinery of the toolkit, one concept per file; the commands and the model files are at the top."""
