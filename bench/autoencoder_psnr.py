"""The reconstruction PSNR of an autoencoder (ours or a diffusers folder) on held-out images of its config's data set.

    python bench/autoencoder_psnr.py --config configs/latent-quickstart.yaml \
        --autoencoder checkpoints/latent-quickstart-autoencoder/last.pt [--n 1000] [section.field=value ...]

Held out: the shapes of another seed (data.seed + 1), which the autoencoder never saw; for another data set give
overrides that name images it was not trained on (e.g. data.root=held-out-folder). Each image is encoded to the
mean of q(z | x) and decoded, as latent diffusion's cache and decoder use it. Prints the PSNR (dB, images in
[-1, 1]: 10 log10(4 / MSE) over all pixels) and, for scale, that of each image's mean colour.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from config import load_config  # noqa: E402
from dataset import build_dataset  # noqa: E402
from ddpm.autoencoder import psnr  # noqa: E402
from ddpm.cli import ArgumentParser, cli  # noqa: E402
from ddpm.codecs import load_autoencoder  # noqa: E402
from ddpm.image_cache import load_uint8  # noqa: E402
from ddpm.images import to_float  # noqa: E402


@cli
def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--autoencoder", required=True)
    p.add_argument("--n", type=int, default=1000, help="held-out images")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if cfg.data.dataset == "shapes":
        cfg = load_config(args.config, [f"data.seed={cfg.data.seed + 1}", f"data.num_images={args.n}", *args.overrides])
    torch.set_num_threads(1)
    ae = load_autoencoder(args.autoencoder, "cpu")
    ds = build_dataset(cfg.data)
    x = to_float(load_uint8(ds, cfg.data)[0][:args.n])
    x_hat = torch.cat([ae.decode(ae.moments(x[i:i + args.batch_size])[0]) for i in range(0, len(x), args.batch_size)])
    print(f"reconstruction PSNR {psnr(x, x_hat):.2f} dB over {len(x)} held-out images "
          f"(each image's mean colour: {psnr(x, x.mean((2, 3), keepdim=True).expand_as(x)):.2f} dB)")


if __name__ == "__main__":
    main()
