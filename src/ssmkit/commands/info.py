"""``ssmkit info PRESET|FOLDER``: parameters and inference-state sizes of a model shape."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "info", help="parameters and state bytes per token of a preset or checkpoint"
    )
    parser.add_argument(
        "model",
        help="a preset name (see --list), a Hugging Face checkpoint folder, or a config .json/.yaml file",
    )
    parser.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["float32", "bfloat16", "float16"],
        help="dtype of the states (the SSM states are always fp32)",
    )
    parser.add_argument("--list", action="store_true", help="list the presets and exit")
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    parser.set_defaults(func=run)


def model_info(config, dtype_name: str = "bfloat16") -> dict:
    """Parameter counts and state sizes of ``config`` (nothing is allocated: meta tensors)."""
    import torch

    from ssmkit.models import LanguageModel

    dtype = getattr(torch, dtype_name)
    with torch.device("meta"):
        model = LanguageModel(config).to(dtype)
        cache = model.allocate_cache(1)
    total = model.num_parameters()
    embedding = model.embedding.weight.numel()
    fixed = sum(s.nbytes() for s in cache.states if hasattr(s, "ssm"))
    item = torch.empty((), dtype=dtype).element_size()
    kv_per_token = sum(
        2 * block.mixer.num_kv_heads * block.mixer.head_dim * item
        for kind, block in zip(config.layer_types, model.layers)
        if kind == "attention"
    )
    counts: dict[str, int] = {}
    for kind in config.layer_types:
        counts[kind] = counts.get(kind, 0) + 1
    return {
        "parameters": total,
        "parameters_without_embedding": total - embedding,
        "embedding_parameters": embedding,
        "layers": counts,
        "d_model": config.d_model,
        "vocab_size": config.vocab_size,
        "padded_vocab_size": config.padded_vocab_size,
        "recurrent_state_bytes_per_sequence": fixed,
        "kv_cache_bytes_per_token": kv_per_token,
        "state_dtype": dtype_name,
    }


def _load_config(name: str):
    from pathlib import Path

    from ssmkit.models import ModelConfig, get_preset
    from ssmkit.models.presets import PRESETS

    if name in PRESETS:
        return get_preset(name)
    path = Path(name)
    if path.is_dir():
        import json

        from ssmkit.models.hf import config_from_hf

        return config_from_hf(json.loads((path / "config.json").read_text()), path)
    if path.is_file():
        return ModelConfig.load(path)
    raise SystemExit(
        f"{name!r} is neither a preset ({', '.join(PRESETS)}) nor a checkpoint folder or config file"
    )


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from ssmkit.models.presets import PRESETS

    console = Console()
    if args.list:
        for name in PRESETS:
            console.print(name)
        return 0
    info = model_info(_load_config(args.model), args.dtype)
    table = Table(title=f"ssmkit info {args.model}")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_row("parameters", f"{info['parameters']:,} ({info['parameters'] / 1e6:.1f}M)")
    table.add_row("  without embedding", f"{info['parameters_without_embedding']:,}")
    table.add_row("layers", ", ".join(f"{n} {k}" for k, n in info["layers"].items()))
    table.add_row("d_model", str(info["d_model"]))
    table.add_row("vocab (padded)", f"{info['vocab_size']} ({info['padded_vocab_size']})")
    table.add_row(
        "recurrent state per sequence (constant)", _bytes(info["recurrent_state_bytes_per_sequence"])
    )
    table.add_row(f"KV cache per token ({args.dtype})", _bytes(info["kv_cache_bytes_per_token"]))
    console.print(table)
    if args.json:
        import json

        from ssmkit.models.config import atomic_write_text

        atomic_write_text(Path(args.json), json.dumps(info, indent=2))
    return 0


def _bytes(n: int) -> str:
    if n < 1024:
        return f"{n:,} B"
    value, units = n / 1024, ["KiB", "MiB", "GiB"]
    while value >= 1024 and len(units) > 1:
        value, units = value / 1024, units[1:]
    return f"{value:.1f} {units[0]} ({n:,} B)"
