"""Pack / unpack the MiniLM text encoder for a GPU training machine that can take only ~64 MB of files.

The house trainers need the frozen all-MiniLM-L6-v2 (87 MB fp32) on the GPU machine, which has no network.
``pack`` keeps what those runs can use: the transformer layers in fp16 and, of the 30,522 word-embedding rows,
only the rows of tokens that occur in house captions, class prompts and sample prompts (enumerated from the
house dataset's specs, every split), in fp32. ``unpack`` rebuilds a normal fp32 MiniLM folder from that (rows
not kept are zero; ``--check`` tokenizes fresh captions and fails if any token was not kept).

    python scripts/device/pack_minilm.py pack .dev/minilm [--samples 60000]
    python scripts/device/pack_minilm.py unpack .dev/minilm /tmp/minilm [--check 20000]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

EMB = "embeddings.word_embeddings.weight"


def captions(samples: int, start: int = 0):
    """Captions of ``samples`` dataset indices per split (no pixels rendered) plus every prompt text the
    trainers and evaluations use."""
    from imagesmith.train import house_clip, house_ldm
    from imagesmith.train.backdrops import make_backdrop
    from imagesmith.train.house_data import SPLITS, HouseSampleDataset, load_house_dataset, sample_caption
    index = load_house_dataset()
    out: list[str] = []
    for split in SPLITS:
        ds = HouseSampleDataset(index, split, size=8, epoch_length=start + samples)
        for i in range(start, start + samples):
            spec = ds.spec(i)
            phrase = make_backdrop(spec.backdrop_kind, 8, np.random.default_rng(spec.backdrop_seed))[1]
            out.append(sample_caption(index.object(spec.object_key), spec, phrase)[1])
    names = sorted({o.name for o in index.objects})
    for name in names:
        out += house_clip.class_prompts(name) + [house_clip.zero_shot_prompt(name), name]
    out += list(house_ldm.SAMPLE_PROMPTS) + [""]
    return out


def token_ids(tokenizer, texts) -> set[int]:
    ids: set[int] = set(tokenizer.all_special_ids)
    for k in range(0, len(texts), 4096):
        for row in tokenizer(texts[k:k + 4096])["input_ids"]:
            ids.update(row)
    return ids


def pack(out: Path, samples: int) -> None:
    from transformers import AutoTokenizer
    from imagesmith.models.house import minilm_dir
    src = minilm_dir()
    tok = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    keep = sorted(token_ids(tok, captions(samples)))
    state = load_file(str(src / "model.safetensors"))
    emb_key = next(k for k in state if k.endswith(EMB))
    packed = {k: (v.half() if v.is_floating_point() else v) for k, v in state.items() if k != emb_key}
    ids = torch.tensor(keep, dtype=torch.long)
    packed["_kept_ids"], packed["_kept_rows"] = ids, state[emb_key][ids].float().contiguous()
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            shutil.copy2(f, out / f.name)
        elif f.is_dir():
            shutil.copytree(f, out / f.name, dirs_exist_ok=True)
    save_file(packed, str(out / "packed.safetensors"), metadata={"embedding_key": emb_key,
                                                                  "vocab": str(state[emb_key].shape[0])})
    print(f"kept {len(keep)} of {state[emb_key].shape[0]} token rows; "
          f"{(out / 'packed.safetensors').stat().st_size / 1e6:.1f} MB")


def unpack(src: Path, out: Path, check: int) -> None:
    from safetensors import safe_open
    with safe_open(str(src / "packed.safetensors"), "pt") as f:
        meta = f.metadata()
    packed = load_file(str(src / "packed.safetensors"))
    ids, rows = packed.pop("_kept_ids"), packed.pop("_kept_rows")
    emb = torch.zeros(int(meta["vocab"]), rows.shape[1])
    emb[ids] = rows
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in packed.items()}
    state[meta["embedding_key"]] = emb
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name != "packed.safetensors":
            (shutil.copytree(f, out / f.name, dirs_exist_ok=True) if f.is_dir() else shutil.copy2(f, out / f.name))
    save_file(state, str(out / "model.safetensors"))
    if check:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
        missing = token_ids(tok, captions(check, start=10_000_000)) - set(ids.tolist())
        if missing:
            sys.exit(f"unpack: {len(missing)} caption tokens were not kept: {tok.convert_ids_to_tokens(sorted(missing))[:20]}")
        print(f"unpack: every token of {check} fresh captions per split is kept")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack")
    a.add_argument("out", type=Path)
    a.add_argument("--samples", type=int, default=60000)
    b = sub.add_parser("unpack")
    b.add_argument("src", type=Path)
    b.add_argument("out", type=Path)
    b.add_argument("--check", type=int, default=0)
    args = ap.parse_args()
    pack(args.out, args.samples) if args.cmd == "pack" else unpack(args.src, args.out, args.check)


if __name__ == "__main__":
    main()
