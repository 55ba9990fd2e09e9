"""Joint-mode encode and decode time per view, with glibc's default heap and with ``lmvic.heap``.

The first views of a work folder's coding order (whole views as ``lmvic eval`` crops them) are coded
to a file and decoded from it, once in a child process per heap setting (``mallopt`` is
process-wide): ``system`` leaves glibc's thresholds alone, ``retain`` calls
``lmvic.heap.retain_freed_memory`` first, as the ``lmvic`` command does. Per view it prints wall,
user and system CPU seconds and minor page faults, then the peak resident memory and a digest of
the file and of the decoded views (the two settings must agree bit for bit).

    python benchmarks/coding_speed.py /work/runs/fox [--views 4] [--quality 3] [--threads 1]

Measured (session 15, fox, 4 views, q3, 1 thread, the other core busy with a training): encode
8.29 → 5.72 s/view (sys 2.26 → 0.13 s), decode 2.74 → 1.96 s/view, peak memory 1.74 → 1.83 GB, the
same file and views. With 8 views the peak falls from 2.63 to 1.77 GB once a coded view's decoder
features are dropped when its successor is done, and to 1.49 GB once only the latest view is held as
tensors (``DecodedChain``); ``benchmarks/results/coding_speed.txt``.
"""
from __future__ import annotations

import argparse
import hashlib
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEAPS = ("system", "retain")


def _usage() -> tuple[float, float, float, int]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), r.ru_utime, r.ru_stime, r.ru_minflt


def _per_view(before: tuple, after: tuple, views: int) -> str:
    wall, user, system, faults = ((a - b) / views for a, b in zip(after, before))
    return f"{wall:6.2f} s wall  user {user:5.2f} s  sys {system:5.2f} s  {faults:9.0f} minor faults"


def run_child(work: Path, views: int, quality: int, threads: int, heap: str) -> None:
    """Code and decode in this process with heap setting ``heap`` and print the figures."""
    import torch

    from joint_steps import first_views
    from lmvic.heap import retain_freed_memory
    from lmvic.scene_codec import SceneInput, decode_scene_file, encode_scene_file, load_joint

    if heap == "retain" and not retain_freed_memory():
        sys.exit("this C library has no mallopt: nothing to compare")
    torch.set_num_threads(threads)
    names, images, depths, K, T = first_views(work, views, 0)
    codec = load_joint("joint-cpu")
    scene = SceneInput(names, images, depths, K, T)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scene.lmv"
        start = _usage()
        nbytes, _ = encode_scene_file(path, codec, scene, range(views), quality)
        coded = _usage()
        decoded = decode_scene_file(path, codec)
        done = _usage()
        file_digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    views_digest = hashlib.sha256(b"".join(decoded.images[n].tobytes() for n in names)).hexdigest()[:12]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"{heap:>6} encode {_per_view(start, coded, views)}")
    print(f"{heap:>6} decode {_per_view(coded, done, views)}")
    print(f"{heap:>6} peak {peak:.2f} GB, file {nbytes} B sha256 {file_digest}, decoded views sha256 {views_digest}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work", type=Path, help="work folder whose geometry and relations stages have run")
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--quality", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--heap", choices=HEAPS, help=argparse.SUPPRESS)  # the child's setting
    args = ap.parse_args()
    if args.heap:
        run_child(args.work, args.views, args.quality, args.threads, args.heap)
        return
    print(f"{args.work.name}: {args.views} views, quality {args.quality}, {args.threads} thread(s); per view:")
    for heap in HEAPS:
        subprocess.run([sys.executable, __file__, str(args.work), "--views", str(args.views), "--quality",
                        str(args.quality), "--threads", str(args.threads), "--heap", heap], check=True)


if __name__ == "__main__":
    main()
