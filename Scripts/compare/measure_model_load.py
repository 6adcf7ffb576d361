#!/usr/bin/env python3
"""Peak memory of `attn mha --model DIR --layer L` on a Llama-3-8B-shaped sharded checkpoint:
loading one layer must read only that layer's bytes (issue #25: peak RSS ≤ the layer's attention
weights as float32 + 64 MiB).

    "$VENV/bin/python" Scripts/compare/measure_model_load.py [--layers 32] [--layer 13]
                       [--tokens 16] [--threads 1] [--dir PARENT] [--keep]
    ($VENV: the reference environment; any python3 with numpy 2.x also runs it)

The script builds, in a temporary folder (under --dir, else the system's), a checkpoint folder
shaped like Meta-Llama-3.1-8B's without 16 GB of disk:
  config.json   llama: hidden 4096, 32 heads on 8 K/V heads, head_dim 128, intermediate 14336,
                vocab 128256, rope_theta 500000 with llama3 rope_scaling (factor 8), --layers
                layers (32, the real model's, by default), bfloat16
  model-0000k-of-0000n.safetensors   every tensor of the model (embeddings, each layer's
                attention, MLP and norms, the final norm, lm_head) in BF16, split into shards of
                at most 5 GB in module order as save_pretrained splits them; each shard is a real
                safetensors file (8-byte header length, JSON header with data_offsets, data)
                whose data are a hole: the header is written, then the file is truncated to its
                full size, so every tensor reads as zeros (finite) and takes no disk. Only the
                chosen layer's q_proj, k_proj, v_proj and o_proj hold data: N(0, 0.02²) rounded
                to bfloat16, written in place (about 84 MB).
  model.safetensors.index.json       the weight_map of every tensor to its shard
Then x [1, --tokens, 4096] N(0, 1) float32 is written beside it, and
    attn mha --model DIR --layer L --input x.npy --out y.npy --threads T --format json
runs under /usr/bin/time (its "maximum resident set size": the kernel's peak RSS of attn alone;
without /usr/bin/time, os.wait4's, which on Linux also counts this script's own peak because
the child is spawned from it) while this script samples /proc/PID/io and /proc/PID/status every
few milliseconds (bytes read, VmHWM). The run must exit 0: attn checks the layer's output against
its float64 reference before writing it.

Printed: the folder's apparent size and the disk it takes, the shard(s) holding the layer, the
layer's attention weights as float32 in memory (q, k, v, o: 4 · (2·4096² + 2·1024·4096) bytes =
160 MiB) and as BF16 on disk, attn's peak RSS, its excess over the weights and whether that is
≤ 64 MiB, the RSS at the first sample where attn had read as many bytes as the layer's BF16
tensors (the read done, before the layer is built from them), the bytes attn read (rchar at the
last sample), and for scale the peak RSS of `attn --version` (the process alone: runtime,
OpenBLAS). Exits 1 when attn fails or the target is missed. The folder is removed at exit unless
--keep.
"""
import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]  # Scripts/compare/ -> the repository
ATTN = Path(os.environ.get("ATTN_BIN", ROOT / ".build" / "release" / "attn"))

# Meta-Llama-3.1-8B's config.json (head_dim written out, as newer transformers save it).
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0",
    "use_cache": True,
    "vocab_size": 128256,
}
SHARD_BYTES = 5_000_000_000  # save_pretrained's max_shard_size="5GB"
SLACK = 64 << 20  # the target's allowance over the weights: 64 MiB
BF16 = 2
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=32, help="num_hidden_layers (default 32)")
    parser.add_argument("--layer", type=int, help="the layer attn reads (default layers // 2 - 3)")
    parser.add_argument("--tokens", type=int, default=16, help="T of x [1, T, 4096] (default 16)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dir", help="where the temporary folder goes (default: the system's)")
    parser.add_argument("--keep", action="store_true", help="keep the folder (its path printed)")
    args = parser.parse_args()
    if args.layers < 1:
        parser.error("--layers must be positive")
    if args.layer is None:
        args.layer = max(0, args.layers // 2 - 3)
    if not 0 <= args.layer < args.layers:
        parser.error(f"--layer must be in 0…{args.layers - 1}")
    if args.tokens < 1 or args.threads < 1:
        parser.error("--tokens and --threads must be positive")
    return args


def tensors(config):
    """Every tensor of LlamaForCausalLM in module order: (name, shape)."""
    e, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    d = config["head_dim"]
    h, hkv = config["num_attention_heads"], config["num_key_value_heads"]
    out = [("model.embed_tokens.weight", [vocab, e])]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", [h * d, e]),
                (p + "self_attn.k_proj.weight", [hkv * d, e]),
                (p + "self_attn.v_proj.weight", [hkv * d, e]),
                (p + "self_attn.o_proj.weight", [e, h * d]),
                (p + "mlp.gate_proj.weight", [inter, e]),
                (p + "mlp.up_proj.weight", [inter, e]),
                (p + "mlp.down_proj.weight", [e, inter]),
                (p + "input_layernorm.weight", [e]),
                (p + "post_attention_layernorm.weight", [e])]
    return out + [("model.norm.weight", [e]), ("lm_head.weight", [vocab, e])]


def nbytes(shape):
    return int(np.prod(shape)) * BF16


def shard(named):
    """Split (name, shape) in order into shards of at most SHARD_BYTES (a tensor larger than
    that alone in its shard), as save_pretrained does."""
    shards, current, size = [], [], 0
    for name, shape in named:
        if current and size + nbytes(shape) > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes(shape)
    return shards + [current] if current else shards


def write_shard(path, named):
    """A safetensors file of `named` BF16 tensors whose data are a hole (zeros): the header, then
    a truncate to the full size. Returns {name: absolute offset of its data}."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in sorted(named):  # safetensors writes a file's tensors sorted by name
        header[name] = {"dtype": "BF16", "shape": shape,
                        "data_offsets": [offset, offset + nbytes(shape)]}
        offset += nbytes(shape)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data start 8-aligned, as safetensors pads
    start = 8 + len(text)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        f.truncate(start + offset)
    return {name: start + header[name]["data_offsets"][0] for name, _ in named}


def write_random_bf16(path, offset, count, rng, std=0.02):
    """N(0, std²) rounded to bfloat16 (nearest, ties to even) written at `offset`, a band at a
    time (this script's own memory stays small)."""
    band = 1 << 20
    with open(path, "r+b") as f:
        f.seek(offset)
        for start in range(0, count, band):
            n = min(band, count - start)
            bits = (rng.standard_normal(n, dtype=np.float32) * np.float32(std)).view(np.uint32)
            rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16
            f.write(rounded.astype("<u2").tobytes())


def build_folder(folder, config, layer, rng):
    """The checkpoint folder; returns (shard of each tensor, shape of each tensor)."""
    named = tensors(config)
    shards = shard(named)
    weight_map, offsets, shapes = {}, {}, dict(named)
    for k, members in enumerate(shards, 1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        starts = write_shard(folder / file, members)
        offsets.update({name: (file, at) for name, at in starts.items()})
        weight_map.update({name: file for name, _ in members})
    total = sum(nbytes(shape) for _, shape in named)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for proj in ATTENTION:
        name = f"model.layers.{layer}.self_attn.{proj}.weight"
        file, at = offsets[name]
        write_random_bf16(folder / file, at, int(np.prod(shapes[name])), rng)
    return weight_map, shapes


def sizes(folder):
    """The folder's apparent size and the disk its files take (allocated blocks)."""
    apparent = allocated = 0
    for p in folder.iterdir():
        st = p.stat()
        apparent += st.st_size
        allocated += st.st_blocks * 512
    return apparent, allocated


class Sampler(threading.Thread):
    """Samples /proc/PID/io's rchar and /proc/PID/status's VmHWM of attn (the child of
    /usr/bin/time, or the process itself) until it exits; the last readings are kept."""

    def __init__(self, pid, via_time, read_mark):
        super().__init__(daemon=True)
        self.pid, self.via_time, self.read_mark = pid, via_time, read_mark
        self.rchar = self.hwm = None
        # VmRSS at the first sample where rchar had reached read_mark (the layer's bytes read).
        self.rss_after_read = None
        self.samples = 0

    def target(self):
        if not self.via_time:
            return self.pid
        try:
            children = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()
        except OSError:
            return None
        return int(children[0]) if children else None

    def run(self):
        attn = None
        while True:
            attn = attn or self.target()
            if attn is None:
                if not Path(f"/proc/{self.pid}").exists():
                    return
                time.sleep(0.001)
                continue
            try:
                io = Path(f"/proc/{attn}/io").read_text()
                status = Path(f"/proc/{attn}/status").read_text()
            except OSError:
                return
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            if "VmHWM" not in fields:  # a zombie: exited
                return
            self.hwm = int(fields["VmHWM"].split()[0]) * 1024
            self.rchar = int(dict(line.split(": ") for line in io.splitlines())["rchar"])
            if self.rss_after_read is None and self.read_mark and self.rchar >= self.read_mark:
                self.rss_after_read = int(fields["VmRSS"].split()[0]) * 1024
            self.samples += 1
            time.sleep(0.003)


def run_measured(command, read_mark=None):
    """Run `command`; (exit code, stdout, peak RSS bytes, how it was measured, sampler)."""
    use_time = Path("/usr/bin/time").exists()
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report, \
            tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        full = (["/usr/bin/time", "-f", "%M", "-o", report.name] if use_time else []) + command
        child = subprocess.Popen(full, stdout=out, stderr=err)
        sampler = Sampler(child.pid, use_time, read_mark)
        sampler.start()
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        sampler.join()
        out.seek(0)
        err.seek(0)
        if use_time:
            peak, how = int(report.read().strip().splitlines()[-1]) * 1024, "/usr/bin/time"
        else:
            peak, how = usage.ru_maxrss * 1024, "os.wait4 (counts this script's peak too)"
        if child.returncode != 0:
            sys.stderr.write(err.read())
        return child.returncode, out.read(), peak, how, sampler


def mib(n):
    return f"{n / 2**20:,.1f} MiB ({n / 1e6:,.1f} MB)"


def main():
    args = parse_args()
    if not ATTN.exists():
        sys.exit(f"{ATTN} not found: run Scripts/setup.sh first")
    config = dict(CONFIG, num_hidden_layers=args.layers)
    parent = Path(args.dir or tempfile.gettempdir())
    free = shutil.disk_usage(parent).free
    # The data written for real: the layer's attention in BF16, headers, x and y.
    needed = 4 * 4096 * 4096 * BF16 + (256 << 20)
    if free < needed:
        sys.exit(f"{parent} has {mib(free)} free; the folder needs about {mib(needed)} of real "
                 "disk (its tensors are holes)")
    work = Path(tempfile.mkdtemp(prefix="attn-model-load-", dir=parent))
    try:
        status = measure(args, config, work, free)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    sys.exit(status)


def measure(args, config, work, free):
    rng = np.random.default_rng(25)
    folder = work / "Llama-3-8B-shaped"
    folder.mkdir()
    start = time.perf_counter()
    weight_map, shapes = build_folder(folder, config, args.layer, rng)
    built = time.perf_counter() - start
    apparent, allocated = sizes(folder)
    x = np.lib.format.open_memmap(work / "x.npy", mode="w+", dtype=np.float32,
                                  shape=(1, args.tokens, config["hidden_size"]))
    x[:] = rng.standard_normal(x.shape, dtype=np.float32)
    x.flush()
    del x

    names = [f"model.layers.{args.layer}.self_attn.{p}.weight" for p in ATTENTION]
    elements = sum(int(np.prod(shapes[n])) for n in names)
    weights = 4 * elements  # float32, as attn holds them
    holding = sorted({weight_map[n] for n in names})
    shard_files = sorted(set(weight_map.values()))

    print(f"folder: {len(shard_files)} shards + index + config.json, "
          f"{len(weight_map)} tensors, {config['num_hidden_layers']} layers, BF16; "
          f"apparent size {apparent / 1e9:.2f} GB, on disk {mib(allocated)} "
          f"(free before: {free / 1e9:.1f} GB); built in {built:.1f} s")
    if allocated > apparent / 4:
        print("  note: this filesystem stored the holes: the folder takes real disk")
    print(f"layer {args.layer}'s attention (q, k, v, o_proj) in {', '.join(holding)}: "
          f"{elements:,} parameters, {mib(elements * BF16)} as BF16 on disk, "
          f"{mib(weights)} as float32 in memory")

    baseline = run_measured([str(ATTN), "--version"])
    command = [str(ATTN), "mha", "--model", str(folder), "--layer", str(args.layer),
               "--input", str(work / "x.npy"), "--out", str(work / "y.npy"),
               "--threads", str(args.threads), "--format", "json"]
    print("$ " + " ".join(command))
    start = time.perf_counter()
    code, out, peak, how, sampler = run_measured(command, read_mark=elements * BF16)
    wall = time.perf_counter() - start
    if code != 0:
        print(f"attn exited {code}: not measured")
        return 1
    report = json.loads(out)
    verified = report.get("verified")
    y = np.load(work / "y.npy")
    print(f"attn exited 0 in {wall:.2f} s, verified: {verified}, wrote y {list(y.shape)}, "
          f"finite: {bool(np.isfinite(y).all())}; model: {report.get('model')}")
    limit = weights + SLACK
    excess = peak - weights
    met = peak <= limit and verified is True
    print(f"peak RSS of attn ({how}): {mib(peak)}")
    if sampler.hwm is not None:
        print(f"  VmHWM at the last of {sampler.samples} samples: {mib(sampler.hwm)}")
    if sampler.rss_after_read is not None:
        print(f"  RSS once attn had read the layer's bytes (first sample with rchar ≥ "
              f"{mib(elements * BF16)}): {mib(sampler.rss_after_read)}, "
              f"{mib(sampler.rss_after_read - weights)} over the weights")
    print(f"peak RSS of `attn --version` (the process alone): {mib(baseline[2])}")
    print(f"peak RSS − the layer's float32 attention weights: {mib(excess)}")
    print(f"target: peak RSS ≤ weights + 64 MiB = {mib(limit)}: "
          + ("met" if met else "NOT met") + f" (margin {mib(limit - peak)})")
    if sampler.rchar is not None:
        print(f"bytes attn read (rchar at its last sample): {mib(sampler.rchar)} of the folder's "
              f"{apparent / 1e9:.2f} GB (the layer's attention: {mib(elements * BF16)})")
    return 0 if met else 1


if __name__ == "__main__":
    main()
