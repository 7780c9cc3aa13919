"""`exaone export`: write a checkpoint in another format.

  --format gguf             one .gguf file for llama.cpp (needs `pip install 'exaone[gguf]'`)
  --format int8 | int4      a weight-only quantized checkpoint directory (exaone.quant)
"""
from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("--format", required=True, choices=["gguf", "int8", "int4"])
    p.add_argument("--model", required=True, help="checkpoint directory to read")
    p.add_argument("--out", required=True, help="output .gguf file (gguf) or directory (int8/int4)")
    p.add_argument("--outtype", default="f16", choices=["f32", "f16", "q8_0"], help="gguf: tensor type of the matrices")
    p.add_argument("--force", action="store_true",
                   help="gguf: write a hybrid model llama.cpp would run without sliding windows (see docs/quantization.md)")
    p.add_argument("--group-size", type=int, default=128, help="int4: input columns per scale (32, 64, 128, 256)")
    p.add_argument("--lm-head", default="int8", choices=["int8", "int4", "same", "none"],
                   help="int8/int4: how lm_head is stored: int8 (default, as exaone.load(quantize=...)), int4, "
                        "same (the body's method) or none (float)")


_LM_HEAD = {"int8": "int8", "int4": "int4", "same": True, "none": False}  # --lm-head -> quantize_model(lm_head=)


def run(args) -> int:
    if args.format == "gguf":
        from ..export_gguf import export_gguf

        path = export_gguf(args.model, args.out, outtype=args.outtype, force=args.force)
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {args.outtype})")
        return 0
    from ..loader import load
    from ..quant import quantize_model, save_quantized, weight_bytes

    model = quantize_model(load(args.model), args.format, group_size=args.group_size, lm_head=_LM_HEAD[args.lm_head])
    path = save_quantized(model, args.out)
    import shutil
    from pathlib import Path

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "chat_template.jinja", "generation_config.json"):  # so the directory runs as is
        if (Path(args.model) / name).is_file():
            shutil.copy(Path(args.model) / name, path / name)
    print(f"wrote {path} ({args.format}, {weight_bytes(model) / 1e6:.1f} MB of weights read per token)")
    return 0
