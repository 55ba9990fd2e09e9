"""Shipped weights: export a trained codec to ``lmvic/weights/`` and load it back by name.

A weight file ``<name>.pt`` holds the architecture (size, λ per quality), the state dict with the
CDF tables already built (``update()``), and parameters stored as float16 when ``half`` (loaded
back into float32: encoder and decoder use the same rounded weights, so coding stays bit-exact).
A sidecar ``<name>.json`` records the file's SHA-256; loading checks it, so a missing, truncated or
altered file is a clear ``WeightsError`` instead of a crash or a silently different decoder.
"""
from __future__ import annotations

import hashlib
import io
import json
import time
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import torch

from lmvic.models.single_view import SingleViewCodec, build_recorded, build_single_view
from pipelines.cache import atomic_write_bytes

WEIGHTS_DIR = Path(__file__).parent / "weights"
FORMAT = 1
Model = TypeVar("Model")


class WeightsError(RuntimeError):
    """Shipped weights are missing, corrupt or of another format."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def ship_ready(model: torch.nn.Module, half: bool = True) -> None:
    """Make ``model`` what a decoder loads from its shipped file: parameters rounded to float16 if
    ``half`` (first, so the CDFs are built from the rounded weights), quantiles and CDFs refreshed."""
    def rounded() -> None:
        if half:
            with torch.no_grad():
                for p in model.parameters():
                    p.copy_(p.half().float())

    rounded()
    model.update(force=True, update_quantiles=True)
    rounded()  # the quantiles update() set are stored as float16 too


def write_weights(model: torch.nn.Module, path: Path, payload: dict, meta: dict, half: bool = True) -> Path:
    """Ship ``model`` (made :func:`ship_ready`, parameters stored as float16 if ``half``) to ``path``
    with ``{**payload, "state_dict"}`` and a ``.json`` sidecar (SHA-256 + ``meta``)."""
    ship_ready(model, half)
    params = {name for name, _ in model.named_parameters()}
    # only parameters go to float16: buffers such as CompressAI's likelihood lower bound (1e-9) would
    # round to 0 (infinite estimated bits) and the scale table must stay exact
    sd = {k: (v.half() if half and k in params else v) for k, v in model.state_dict().items()}
    return _write_file(Path(path), {**payload, "state_dict": sd}, meta)


def _write_file(path: Path, content: dict, meta: dict) -> Path:
    """``torch.save`` ``content`` to ``path`` and its sidecar ``{"sha256", **meta}``, each atomically."""
    buf = io.BytesIO()
    torch.save(content, buf)
    atomic_write_bytes(path, buf.getvalue())
    atomic_write_bytes(path.with_suffix(".json"), (json.dumps({**meta, "sha256": _sha256(buf.getvalue())},
                                                              indent=1) + "\n").encode())
    return path


def _verified_bytes(path: Path, what: str) -> tuple[bytes, dict]:
    """(bytes, sidecar) of a shipped file; ``WeightsError`` if either is missing or they disagree."""
    path = Path(path)
    meta_path = path.with_suffix(".json")
    if not path.exists() or not meta_path.exists():
        raise WeightsError(f"{what} not found in {path.parent} (need {path.name} and {meta_path.name})")
    data = path.read_bytes()
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise WeightsError(f"corrupt weight metadata {meta_path}: {exc}") from exc
    if _sha256(data) != meta.get("sha256"):
        raise WeightsError(f"corrupt weight file {path}: SHA-256 does not match {meta_path.name}")
    return data, meta


def read_weights(path: Path, expected_format: int, what: str) -> dict:
    """A file written by :func:`write_weights`, checked against its sidecar (``WeightsError`` if
    missing, corrupt or of another format); its state_dict back in float32."""
    data, _ = _verified_bytes(path, what)
    ck = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if ck.get("format") != expected_format:
        raise WeightsError(f"{path} has weight format {ck.get('format')}, expected {expected_format}")
    ck["state_dict"] = {k: v.float() if v.dtype == torch.float16 else v for k, v in ck["state_dict"].items()}
    return ck


def export_single_view(state: dict[str, torch.Tensor], size: str, lambdas: tuple[float, ...],
                       name: str, half: bool = True, directory: Path = WEIGHTS_DIR,
                       entropy: str = "hyperprior", training: str = "") -> Path:
    """Build the codec from ``state``, refresh quantiles and CDFs, and write ``name``.pt/.json
    (``training``: the history the sidecar records, see :func:`training_history`)."""
    model = build_single_view(size, lambdas, entropy=entropy)
    model.load_state_dict(state, strict=False)
    arch = {"size": size, "lambdas": list(lambdas), "entropy": entropy}
    return write_weights(model, directory / f"{name}.pt", {"format": FORMAT, **arch},
                         {**arch, "qualities": len(lambdas), "half": half, **({"training": training} if training else {})},
                         half)


def recorded_training(source: str) -> str:
    """The training history of the weights ``source`` names: that in the sidecar of a shipped name or
    of a ``.pt`` weight file beside its ``.json``; for a single-view run's checkpoint, the history its run
    started from followed by :func:`run_summary`; "" for anything else (a fresh start)."""
    if not source:
        return ""
    path = Path(source)
    meta = path.with_suffix(".json") if path.suffix == ".pt" else WEIGHTS_DIR / f"{source}.json"
    if path.suffix == ".pt" and not meta.exists() and path.exists():
        ck = _load_checkpoint(path)
        if isinstance(ck, dict) and "opt" in ck and "cache_dir" in ck.get("config", {}):  # a single-view run's checkpoint
            return training_history(ck["config"].get("init_history", ""), run_summary(ck))
        return ""
    try:
        return json.loads(meta.read_text()).get("training", "")
    except (OSError, json.JSONDecodeError):
        return ""


def training_history(previous: str, run: str) -> str:
    """An exported file's history: ``previous`` (that of the weights the run started from), then today's
    date and ``run`` (one line on the run)."""
    dated = f"{time.strftime('%Y-%m-%d', time.gmtime())}: {run}"
    return f"{previous}; {dated}" if previous else dated


def load_single_view(name: str = "single_view_cpu", directory: Path = WEIGHTS_DIR) -> SingleViewCodec:
    """The shipped codec ``name`` in eval mode, CDFs ready for ``compress``/``decompress``."""
    ck = read_weights(directory / f"{name}.pt", FORMAT, f"shipped weights {name!r}")
    model = build_recorded(ck)
    model.load_state_dict(ck["state_dict"])
    return model.eval()


def load_named(model_id: str, known: Sequence[str], load: Callable[[str], Model], what: str) -> Model:
    """``load(model_id)`` for the model a file names: an id outside ``known`` is a ``BitstreamError``
    (a foreign or corrupt file), missing or corrupt weights a one-line ``LmvicError``."""
    from lmvic.bitstream import BitstreamError
    from pipelines.errors import LmvicError

    if model_id not in known:
        raise BitstreamError(f"unknown {what} model {model_id!r} (known: {', '.join(known)})")
    try:
        return load(model_id)
    except WeightsError as exc:
        raise LmvicError(str(exc)) from exc


def single_view_from(source: str) -> SingleViewCodec:
    """Single-view weights named by ``source``: a shipped name (``single_view_cpu``), an exported
    ``.pt`` with its sidecar, or a training checkpoint/snapshot (its EMA weights when kept)."""
    path = Path(source)
    if path.suffix != ".pt":
        return load_single_view(source)
    if path.with_suffix(".json").exists():
        return load_single_view(path.stem, path.parent)
    return checkpoint_model(path)[0]


def weights_sha256(name: str, directory: Path = WEIGHTS_DIR) -> str:
    """SHA-256 recorded in the sidecar of the shipped weights ``name`` (identifies results measured with them)."""
    meta = directory / f"{name}.json"
    if not meta.exists():
        raise WeightsError(f"weights {name!r} not found in {directory}")
    return json.loads(meta.read_text())["sha256"]


def weights_id(name: str, directory: Path = WEIGHTS_DIR) -> str:
    """The scene container's digest of the shipped weights ``name`` (``lmvic.bitstream.weights_digest``)."""
    from lmvic.bitstream import weights_digest

    return weights_digest(weights_sha256(name, directory))


def base_reference(base: str, directory: Path = WEIGHTS_DIR) -> dict:
    """``{"base", "base_sha256"}`` of the shipped single-view weights a model was trained on top of
    (the model's file then stores only what it adds)."""
    return {"base": base, "base_sha256": weights_sha256(base, directory)}


def load_base(ck: dict, what: str, directory: Path = WEIGHTS_DIR) -> SingleViewCodec:
    """The single-view codec named by ``ck``'s :func:`base_reference`; ``WeightsError`` if the shipped
    file is not the one ``what`` was trained on."""
    meta = directory / f"{ck['base']}.json"
    if not meta.exists():
        raise WeightsError(f"{what} is built on the single-view weights {ck['base']!r}, not found in {directory}")
    if json.loads(meta.read_text()).get("sha256") != ck["base_sha256"]:
        raise WeightsError(f"{what} was trained on other {ck['base']!r} weights than the ones shipped")
    return load_single_view(ck["base"], directory)


def rebase(name: str, previous_base: Path, directory: Path = WEIGHTS_DIR) -> Path:
    """Re-point the shipped model ``name`` (a file holding only what it adds to a single-view base,
    see :func:`base_reference`) at the base now shipped under the same name, once every tensor of
    ``previous_base`` (the base file it was trained on) is found unchanged in it: e.g. after a QPEM
    was trained into the base with its transforms frozen. Rewrites ``name``.pt and its sidecar."""
    path = directory / f"{name}.pt"
    data, meta = _verified_bytes(path, f"shipped weights {name!r}")
    ck = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if "base" not in ck:
        raise WeightsError(f"{name} holds its own backbone: there is no base to re-point")
    old = read_weights(previous_base, FORMAT, f"previous base {previous_base}")["state_dict"]
    new = read_weights(directory / f"{ck['base']}.pt", FORMAT, f"base {ck['base']!r}")["state_dict"]
    changed = [k for k, v in old.items() if k not in new or not torch.equal(v, new[k])]
    if changed:
        raise WeightsError(f"the shipped {ck['base']!r} changes {len(changed)} tensors {name} was trained on "
                           f"(e.g. {changed[0]}): it needs re-training, not re-pointing")
    ck.update(base_reference(ck["base"], directory))
    return _write_file(path, ck, {**meta, "base_sha256": ck["base_sha256"]})


def check_quality(model: SingleViewCodec, quality: int) -> int:
    """``quality`` if it is one of the model's levels 1..Q, else ``WeightsError``."""
    if not 1 <= quality <= model.num_qualities:
        raise WeightsError(f"quality {quality} not available: this model has levels 1..{model.num_qualities}")
    return quality


def checkpoint_model(checkpoint: Path) -> tuple[SingleViewCodec, dict]:
    """(codec, training config) from a training checkpoint or snapshot, its EMA weights when kept.

    The codec is in training mode with no CDFs; call ``update()`` before coding.
    """
    ck = _load_checkpoint(checkpoint)
    return _checkpoint_codec(ck), ck["config"]


def _load_checkpoint(checkpoint: Path) -> dict:
    if not checkpoint.exists():
        raise WeightsError(f"checkpoint not found: {checkpoint}")
    return torch.load(checkpoint, map_location="cpu", weights_only=False)


def _checkpoint_codec(ck: dict) -> SingleViewCodec:
    model = build_recorded(ck["config"])
    model.load_state_dict({**ck["model"], **(ck.get("ema") or {})})
    return model


def export_checkpoint(checkpoint: Path, name: str = "single_view_cpu", half: bool = True,
                      directory: Path = WEIGHTS_DIR) -> Path:
    """Ship a training checkpoint (its EMA weights when it kept them) as ``name``; the sidecar's
    ``training`` continues the history the weights the run started from had then with :func:`run_summary`."""
    ck = _load_checkpoint(checkpoint)
    model, cfg = _checkpoint_codec(ck), ck["config"]
    return export_single_view(model.state_dict(), cfg["size"], tuple(cfg["lambdas"]), name, half, directory,
                              model.entropy, training_history(cfg.get("init_history", ""), run_summary(ck)))


def run_summary(ck: dict) -> str:
    """One line on the single-view training run of the checkpoint ``ck``: what it trained and how long."""
    cfg, sched = ck["config"], ck["config"]["schedule"]
    ranks = f" x {ck['ranks']} ranks" if "ranks" in ck else ""  # checkpoints before session 23 do not say
    return (f"lmvic train {Path(cfg['out_dir']).name}, {ck['step']} steps "
            f"of {cfg['batch']} crops of {cfg['crop']} px per rank, {cfg['precision']}, {sched['kind']} lr "
            f"{sched['peak_lr']:g} -> {sched['final_lr']:g}, EMA {cfg['ema_decay']:g}, trainable {cfg['trainable']}, "
            f"{ck['cpu_seconds'] / 3600:.2f} CPU-h per rank{ranks}, from {cfg['init'] or 'fresh weights'}"
            f"{data_summary(cfg)}")


def data_summary(cfg: dict) -> str:
    """``; data: ...`` on a single-view run's crops (its cache's scales, augmentations), or "" if nothing is known."""
    from lmvic.training.data import cache_settings

    settings = cache_settings(Path(cfg["cache_dir"])) or {}
    parts = []
    if "scales" in settings:
        parts.append(f"photos at {', '.join(f'{s:g}' for s in settings['scales'])} x {settings['max_side']} px")
    if cfg.get("permute_channels"):
        parts.append("RGB channels permuted")
    if cfg.get("dead_leaves_share"):
        photo = (cache_settings(Path(cfg["dead_leaves_dir"])) or {}).get("photo", 0)
        parts.append(f"{cfg['dead_leaves_share']:g} of the crops dead leaves"
                     + (f" ({photo:g} of the leaves photo-textured)" if photo else ""))
    return f"; data: {', '.join(parts)}" if parts else ""


if __name__ == "__main__":
    import sys

    print(export_checkpoint(Path(sys.argv[1]), *sys.argv[2:3]))
