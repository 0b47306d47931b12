"""``ssmkit generate CHECKPOINT_OR_PRESET --prompt TEXT | --ids 1,2,3``: continue a prompt, with tokens/s.

A checkpoint folder with tokenizer files encodes ``--prompt`` and decodes the output; a preset
(random weights: a smoke test of speed, not of text) or a folder without a tokenizer takes
``--ids`` and prints token ids.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate", help="continue a prompt with a checkpoint or a preset (random weights), with tokens/s"
    )
    parser.add_argument("model", help="a Hugging Face checkpoint folder or a preset name (random weights)")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", action="append", help="text (needs tokenizer files); repeat for a batch")
    prompt.add_argument("--ids", action="append", help="comma-separated token ids; repeat for a batch")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--min-p", type=float, default=None)
    parser.add_argument("--repetition-penalty", type=float, default=None)
    parser.add_argument(
        "--stop", default=None, help="comma-separated stop token ids (default: the checkpoint's eos id)"
    )
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--prefill-chunk-size", type=int, default=None)
    parser.add_argument("--no-cuda-graph", action="store_true", help="decode eagerly on CUDA")
    parser.add_argument("--no-stream", action="store_true", help="print the output at the end only")
    parser.set_defaults(func=run)


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError as err:
        raise SystemExit(f"--ids must be comma-separated integers, got {text!r}") from err
    if not ids:
        raise SystemExit("--ids must hold at least one token id")
    return ids


def load_model(name: str, device, dtype):
    """(model, tokenizer or None, folder or None) for a preset name or a checkpoint folder."""
    from pathlib import Path

    import torch

    from ssmkit.models import LanguageModel, get_preset
    from ssmkit.models.presets import PRESETS

    path = Path(name)
    if path.is_dir():
        model = LanguageModel.from_pretrained(path, dtype=dtype)
        tokenizer = None
        try:
            from ssmkit.data.text import load_tokenizer

            tokenizer = load_tokenizer(path)
        except FileNotFoundError:
            pass
        return model.to(device).eval(), tokenizer
    if name in PRESETS:
        torch.manual_seed(0)
        model = LanguageModel(get_preset(name))
        return model.to(device=device, dtype=dtype or torch.float32).eval(), None
    raise SystemExit(f"{name!r} is neither a checkpoint folder nor a preset ({', '.join(PRESETS)})")


def run(args: argparse.Namespace) -> int:
    import sys

    import torch
    from rich.console import Console

    from ssmkit.inference import generate, stream

    console = Console(stderr=True)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model, tokenizer = load_model(args.model, device, dtype)
    if args.prompt is not None:
        if tokenizer is None:
            raise SystemExit(f"{args.model} has no tokenizer files: pass token ids with --ids")
        prompts = [tokenizer.encode(text) for text in args.prompt]
    else:
        prompts = [_parse_ids(text) for text in args.ids]
    if args.stop is not None:
        stop = _parse_ids(args.stop)
    else:
        eos = getattr(tokenizer, "eos_id", None) if tokenizer is not None else model.config.eos_token_id
        stop = [eos] if eos is not None else []
    kwargs = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        stop_token_ids=stop,
        seed=args.seed,
        prefill_chunk_size=args.prefill_chunk_size,
        cuda_graph=False if args.no_cuda_graph else None,
    )
    show = (
        (lambda ids: tokenizer.decode(ids))
        if tokenizer is not None
        else (lambda ids: ",".join(map(str, ids)))
    )

    if len(prompts) == 1 and not args.no_stream:
        import time

        # Stream a single prompt: print each piece as it comes (text is re-decoded whole, since a
        # token can be half a character).
        start = time.perf_counter()
        tokens: list[int] = []
        shown = ""
        for step in stream(model, prompts, **kwargs):
            if step[0] is None:
                break
            tokens.append(step[0])
            text = show(tokens)
            if tokenizer is not None:
                sys.stdout.write(text[len(shown) :])
            else:
                sys.stdout.write(("," if shown else "") + str(step[0]))
            sys.stdout.flush()
            shown = text
        sys.stdout.write("\n")
        seconds = time.perf_counter() - start
        console.print(
            f"[dim]{len(tokens)} tokens in {seconds:.2f} s: {len(tokens) / seconds:.1f} tokens/s "
            f"(prompt {len(prompts[0])} tokens, prefill included, {device})[/dim]"
        )
        return 0

    out = generate(model, prompts, **kwargs)
    for row, sequence in enumerate(out.sequences):
        prefix = f"[{row}] " if len(prompts) > 1 else ""
        print(prefix + show(sequence))
    console.print(
        f"[dim]prefill: {sum(out.prompt_lengths)} tokens in {out.prefill_seconds:.3f} s "
        f"({out.prefill_tokens_per_s:.1f} tokens/s); decode: {out.num_generated - len(prompts)} tokens in "
        f"{out.decode_seconds:.3f} s ({out.decode_tokens_per_s:.1f} tokens/s, batch {len(prompts)}, "
        f"{'CUDA graph' if out.cuda_graph else 'eager'}, {device})[/dim]"
    )
    return 0
