"""Sample-quality metrics: FID, KID and Inception Score, the Inception features they use, and cached
statistics of reference sets.

    extractor = load_inception(weights=None, device="cuda")       # torch-fidelity's Inception, TF FID weights
    ref = reference_stats(cfg.data, extractor, "results/fid_refs")  # computed once, then read from the cache
    feats, logits = extract_features(extractor, batches_of_uint8_images, n)
    fid = frechet_distance(*feature_stats(feats), ref["mu"], ref["sigma"])

A feature extractor is any callable taking uint8 images N x 3 x H x W (a torch tensor) and returning
(features float32 N x D, logits N x K or None) as numpy arrays, with a `name` attribute that keys the
reference cache. The real one is the Inception-v3 of the TF FID code (Heusel et al. 2017) with the
pt_inception-2015-12-05 weights, as implemented by torch-fidelity: pool3 features (2048) for FID and KID,
and the 1008 'logits_unbiased' (pool3 @ W, no bias, as the original Inception Score code) for IS.
"""
import contextlib
import hashlib
import json
import os

import numpy as np
import torch

from dataset import build_dataset
from ddpm.conditions import repeat_to
from ddpm.generation import Sampling, sample_batches
from ddpm.image_cache import folder_signature
from ddpm.images import to_uint8
from ddpm.progress import progress
from utils import UserError, atomic_write, first_line, read_json, thread_map, write_json

# torch-fidelity downloads the weights under the first name, pytorch-fid under the second; the -6726825d
# suffix is the start of the file's SHA-256 (torch.hub's convention): the two are the same file
WEIGHTS_FILES = ("weights-inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05-6726825d.pth")
WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
               "weights-inception-2015-12-05-6726825d.pth")
WEIGHTS_SHA256 = "6726825d"
KID_REF_ROWS = 10_000  # reference feature rows kept in the cache for KID (float32: 80 MB at D = 2048)
REF_CACHE = os.path.join("results", "fid_refs")  # cached reference statistics

# ---- the metrics ------------------------------------------------------------------------------------------


def feature_stats(features: np.ndarray, chunk: int = 4096):
    """Mean and covariance (float64, ddof=1 as in the TF FID code) of the rows of an N x D array.

    The covariance is summed over chunks of centred rows, so 50k x 2048 float32 features never get a
    float64 copy in memory."""
    n = len(features)
    mu = features.mean(axis=0, dtype=np.float64)
    sigma = np.zeros((features.shape[1], features.shape[1]))
    for i in range(0, n, chunk):
        c = features[i:i + chunk].astype(np.float64) - mu
        sigma += c.T @ c
    return mu, sigma / (n - 1)


def psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric PSD matrix, by eigen-decomposition (tiny negative
    eigenvalues from rounding are set to 0)."""
    w, v = np.linalg.eigh((matrix + matrix.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """d^2 = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between N(mu1, S1) and N(mu2, S2), in float64.

    Tr (S1 S2)^(1/2) = sum_i sqrt(lambda_i) over the eigenvalues of S1 S2, which equal those of
    M = S1^(1/2) S2 S1^(1/2) (AB and BA have the same eigenvalues). M is symmetric PSD, so eigvalsh gives
    them accurately and real, even when S1 or S2 is singular (fewer samples than dimensions): no sqrtm of a
    non-symmetric matrix, no eps * I fallback and no imaginary parts to discard, unlike the usual
    scipy.linalg.sqrtm(S1 @ S2) code (the two agree where that one is accurate)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    root1 = psd_sqrt(sigma1)
    m = root1 @ sigma2 @ root1
    lam = np.linalg.eigvalsh((m + m.T) / 2)
    # eigenvalues under the numerical-rank cutoff are rounding noise around 0 (S1 or S2 singular); their
    # square roots (~1e-8 each) would add up over many dimensions, so they count as 0
    lam[lam < len(lam) * np.finfo(np.float64).eps * lam.max(initial=0)] = 0
    tr_covmean = np.sqrt(lam).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def polynomial_mmd(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 between samples x, y (m x d each) with the kernel k(a, b) = (a.b / d + 1)^3:

    MMD^2 = sum_{i!=j} k(x_i, x_j) / (m(m-1)) + sum_{i!=j} k(y_i, y_j) / (m(m-1)) - 2 sum_{i,j} k(x_i, y_j) / m^2
    """
    m, d = x.shape
    kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    return float((kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean())


def kernel_inception_distance(f1, f2, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0):
    """KID (Binkowski et al. 2018): polynomial_mmd over num_subsets random pairs of subsets (drawn without
    replacement within a subset), of subset_size rows capped at the smaller set. Returns (mean, std)."""
    rng = np.random.default_rng(seed)
    m = min(subset_size, len(f1), len(f2))
    if m < 2:
        raise ValueError("KID needs at least 2 samples in each set")
    scores = [polynomial_mmd(f1[rng.choice(len(f1), m, replace=False)].astype(np.float64),
                             f2[rng.choice(len(f2), m, replace=False)].astype(np.float64))
              for _ in range(num_subsets)]
    return float(np.mean(scores)), float(np.std(scores))


def inception_score(logits: np.ndarray, splits: int = 10):
    """IS = exp(E_x KL(p(y|x) || p(y))), p(y) the mean of p(y|x) over the split, for each of `splits`
    consecutive splits (as the original code; capped at N). Returns (mean, std) over the splits.

    Identical predictions give 1; confident predictions spread evenly over K classes give K."""
    logits = np.asarray(logits, np.float64)
    log_p = logits - logits.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))  # log softmax, stable for large logits
    n, splits = len(logits), min(splits, len(logits))
    scores = []
    for k in range(splits):
        part = log_p[k * n // splits:(k + 1) * n // splits]
        log_py = np.log(np.exp(part).mean(axis=0))
        kl = (np.exp(part) * (part - log_py)).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


# ---- the Inception network --------------------------------------------------------------------------------


def inception_weights(path: str | None = None) -> str:
    """The weights file: `path` if given, else the torch hub cache (where torch-fidelity and pytorch-fid
    download it). Nothing is downloaded: without the file this is a one-line UserError saying where to put it."""
    if path:
        if not os.path.isfile(path):
            raise UserError(f"--inception-weights '{path}' not found")
        return path
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    for name in WEIGHTS_FILES:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise UserError(f"the FID Inception weights are not in {folder} and are not downloaded here: save "
                    f"{WEIGHTS_URL} as {os.path.join(folder, WEIGHTS_FILES[0])} (pytorch-fid's "
                    f"{WEIGHTS_FILES[1]} there works too), or pass --inception-weights PATH")


@contextlib.contextmanager
def full_fp32():
    """Turn TF32 off for matmuls and convolutions (cuDNN allows it by default): features of the same
    images should not depend on the GPU generation."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class InceptionExtractor:
    """torch-fidelity's 'inception-v3-compat' (the TF graph of the FID code, with its bilinear resize to
    299 x 299) loaded from a local weights file: (pool3 features N x 2048, unbiased logits N x 1008)."""

    name = "inception-2015-12-05"

    def __init__(self, weights: str, device):
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError:
            raise UserError("FID needs torch-fidelity: pip install -r requirements-eval.txt") from None
        with open(weights, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        if not digest.startswith(WEIGHTS_SHA256):  # other weights: their own reference statistics
            self.name = f"inception-{digest[:8]}"
            print(f"warning: {weights} is not the standard pt_inception-2015-12-05 file (SHA-256 {digest[:8]}, "
                  f"expected {WEIGHTS_SHA256}...); scores will not be comparable with published ones")
        try:  # with a path, torch-fidelity reads the file and never downloads
            net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                              feature_extractor_weights_path=weights)
        except Exception as e:
            raise UserError(f"cannot load the Inception weights '{weights}' ({first_line(e)})") from None
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor):
        with full_fp32():
            features, logits = self.net(images.to(self.device))
        return features.cpu().numpy(), logits.cpu().numpy()


def load_inception(weights: str | None, device) -> InceptionExtractor:
    """The real extractor, weights from `weights` or the hub cache (see inception_weights)."""
    return InceptionExtractor(inception_weights(weights), device)


# ---- features of image sets -------------------------------------------------------------------------------


def to_rgb(images: torch.Tensor) -> torch.Tensor:
    """Grayscale images repeated to 3 channels: the extractors see RGB."""
    return images.repeat(1, 3, 1, 1) if images.shape[1] == 1 else images


def image_batches(ds, batch_size: int, n: int | None = None):
    """Yield the first n images of an ImageDataset as uint8 batches: slices of its array when it has one,
    else files decoded in threads (PIL releases the GIL)."""
    n = len(ds) if n is None else n
    if ds.images is not None:
        for i in range(0, n, batch_size):
            yield ds.images[i:min(i + batch_size, n)]
        return
    for i in range(0, n, batch_size):
        yield torch.stack(list(thread_map(ds.get_uint8, range(i, min(i + batch_size, n)))))


def extract_features(extractor, batches, n: int, desc: str = "features"):
    """Run the extractor over uint8 batches: (features float32 n x D, logits n x K or None)."""
    features, logits = [], []
    with progress(n, desc, "img") as bar:
        for x in batches:
            f, z = extractor(to_rgb(x))
            features.append(np.asarray(f, dtype=np.float32))
            if z is not None:
                logits.append(np.asarray(z, dtype=np.float32))
            bar.update(len(x))
    return np.concatenate(features), (np.concatenate(logits) if logits else None)


# ---- cached reference statistics --------------------------------------------------------------------------


def reference_key(data, extractor_name: str, ds=None) -> dict:
    """What the statistics depend on: the set (for a folder, its files), the image size and channels the
    images are brought to, and the extractor."""
    key = {"dataset": data.dataset, "image_size": data.image_size, "channels": data.channels,
           "extractor": extractor_name}
    if data.dataset == "shapes":
        key.update(num_images=data.num_images, seed=data.seed)
    elif data.dataset == "folder":
        key.update(root=os.path.abspath(data.root), files=folder_signature(ds.files, data.root))
    else:
        key["split"] = "train"
    return key


def reference_cache_path(key: dict, cache_dir: str) -> str:
    label = key["dataset"] if key["dataset"] != "folder" else "folder-" + os.path.basename(key["root"].rstrip("/"))
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    return os.path.join(cache_dir, f"{label}-{key['image_size']}px-{key['extractor']}-{digest}.npz")


def reference_folder(data):
    """The reference set of a folder as a data set (its files listed, none decoded), with at least 2 images; None
    for the other sets. Needs no extractor, so a bad --ref-dir is reported before the Inception is looked for."""
    if data.dataset != "folder":
        return None
    ds = build_dataset(data)
    if len(ds) < 2:
        raise UserError(f"the reference set ({data.dataset} {data.root}) has {len(ds)} image(s); FID and KID "
                        "need at least 2")
    return ds


def reference_stats(data, extractor, cache_dir: str, batch_size: int = 500) -> dict:
    """{'mu', 'sigma', 'features' (at most KID_REF_ROWS rows, for KID), 'n'} of the training images of the
    data config `data`, computed once and cached as an .npz in cache_dir; later calls read the cache."""
    name = getattr(extractor, "name", type(extractor).__name__)
    ds = reference_folder(data)
    key = reference_key(data, name, ds)
    path = reference_cache_path(key, cache_dir)
    if os.path.isfile(path):
        try:
            with np.load(path) as z:
                if str(z["key"]) == json.dumps(key, sort_keys=True):
                    stats = {k: z[k] for k in ("mu", "sigma", "features")} | {"n": int(z["n"])}
                    print(f"reference statistics: reusing {path} ({stats['n']} images)")
                    return stats
        except Exception:  # a damaged cache is computed again
            pass
    ds = ds or build_dataset(data)  # the torchvision sets and shapes are in memory; a folder is streamed
    if len(ds) < 2:
        raise UserError(f"the reference set ({data.dataset} {data.root}) has {len(ds)} image(s); FID and KID "
                        "need at least 2")
    features, _ = extract_features(extractor, image_batches(ds, batch_size), len(ds), desc="reference features")
    mu, sigma = feature_stats(features)
    keep = np.random.default_rng(0).permutation(len(features))[:KID_REF_ROWS]
    stats = {"mu": mu, "sigma": sigma, "features": features[np.sort(keep)], "n": len(features)}
    try:
        atomic_write(path, lambda f: np.savez(f, key=json.dumps(key, sort_keys=True), **stats))
        print(f"reference statistics: computed from {len(features)} images, cached in {path}")
    except UserError as e:
        print(f"reference statistics: computed from {len(features)} images; not cached ({e})")
    return stats


# ---- FID during training, and the records of metrics.json ------------------------------------------------

def fid_of(sampling: Sampling, data_cfg, n: int, extractor, cache_dir=REF_CACHE) -> float:
    """FID of n samples (made in memory with sampling's settings) against the cached statistics of the data set
    `data_cfg` (the config's data section): the hook for train.fid_every.

    The seed is fixed, so successive calls during training see the same noise, which makes the curve
    smoother. `extractor` is a feature extractor as described at the top (the Inception: load_inception).
    The model is put in eval mode for sampling and given back in the mode it was in."""
    if n < 2:
        raise UserError(f"FID needs at least 2 samples, got n={n}")
    ref = reference_stats(data_cfg, extractor, cache_dir, batch_size=sampling.sample_cfg.batch_size)
    model = sampling.model
    num_classes = model.num_classes
    labels = repeat_to(list(range(num_classes)), n) if num_classes else None  # conditional: every class equally
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        batches = sample_batches(sampling, n, labels=labels)
        features, _ = extract_features(extractor, (to_uint8(x) for _, x in batches), n, desc="FID samples")
    finally:
        for m, training in modes:
            m.training = training
    return frechet_distance(*feature_stats(features), ref["mu"], ref["sigma"])


def read_records(path: str) -> list:
    """The records already in the JSON file (a list), or [] when there is none."""
    if not os.path.isfile(path):
        return []
    return read_json(path, "metrics file", list, "; move it away or choose another --out")


def append_record(path: str, record: dict) -> None:
    """Append to the list in `path`, written atomically (a crash leaves the previous list intact)."""
    write_json(path, read_records(path) + [record])


