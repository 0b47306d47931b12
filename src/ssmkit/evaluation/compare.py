"""Reference diff: run our model and a reference side by side and find the first stage that diverges.

Stages are the tensors named by :mod:`ssmkit.layers.tracing` (``embedding``, ``layers.{i}.in_proj``,
``layers.{i}.conv1d``, ``layers.{i}.x`` / ``B`` / ``C`` / ``dt``, ``layers.{i}.ssm_out``, ``gate``,
``norm``, ``out_proj``, ``residual``, ..., ``final_norm``, ``logits``), each laid out
(batch, seqlen, ...). The reference is either the ``transformers`` model of the same checkpoint
folder (its intermediates captured with forward hooks and, for stages inside its functional
code, by wrapping those functions for the duration of the run) or a dump of intermediates saved
as JSON or safetensors by any other runtime.

Per stage and per token the report gives the max absolute difference, the max relative
difference (max |ours - ref| / max |ref|, i.e. relative to the stage's scale, which stays
meaningful where elements cross zero), and the percentage of elements whose signs disagree
(counting only elements with |ref| above 1e-3 of the stage's scale). A stage *diverges* when its
relative difference exceeds the tolerance; the first diverging stage in data-flow order is the
place to look.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ssmkit.layers.tracing import tracing

# Data-flow order of the stages inside one layer; model-level stages go before/after the layers.
LAYER_STAGES = (
    "in_norm", "in_proj", "gate", "conv1d", "x", "B", "C", "dt", "ssm_out", "norm",
    "q", "k", "v", "attn_out", "out_proj", "residual", "mlp_norm", "mlp", "mlp_residual",
)  # fmt: skip
DEFAULT_TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}

_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")


def stage_order(name: str) -> tuple[int, int, int]:
    """Sort key putting stages in data-flow order: embedding, layer 0 stages, ..., final_norm, logits."""
    if name == "embedding":
        return (0, 0, 0)
    match = _LAYER_RE.match(name)
    if match:
        layer, stage = int(match.group(1)), match.group(2)
        rank = LAYER_STAGES.index(stage) if stage in LAYER_STAGES else len(LAYER_STAGES)
        return (1, layer, rank)
    return (2, 0 if name == "final_norm" else 1, 0)


@dataclass
class StageDiff:
    """One row of the table. per_token_max_abs / per_token_max_rel: one value per position."""

    name: str
    layer: int | None
    stage: str
    shape: list[int]
    max_abs: float
    max_rel: float
    sign_mismatch_pct: float
    worst_token: int
    diverged: bool
    per_token_max_abs: list[float] = field(default_factory=list)
    per_token_max_rel: list[float] = field(default_factory=list)


@dataclass
class CompareReport:
    rows: list[StageDiff]
    tolerance: float
    mode: str  # "full" (one forward) or "tokens" (token by token with the cache)
    only_ours: list[str] = field(default_factory=list)
    only_reference: list[str] = field(default_factory=list)

    @property
    def first_divergence(self) -> StageDiff | None:
        return next((row for row in self.rows if row.diverged), None)

    def to_dict(self) -> dict[str, Any]:
        first = self.first_divergence
        return {
            "mode": self.mode,
            "tolerance": self.tolerance,
            "first_divergence": None
            if first is None
            else {"name": first.name, "layer": first.layer, "stage": first.stage, "token": first.worst_token},
            "rows": [asdict(row) for row in self.rows],
            "only_ours": self.only_ours,
            "only_reference": self.only_reference,
        }


def diff_stage(name: str, ours: torch.Tensor, ref: torch.Tensor, tolerance: float) -> StageDiff:
    """Compare one stage; both tensors (batch, seqlen, ...) with the same number of elements."""
    if ours.numel() != ref.numel():
        raise ValueError(
            f"stage {name}: ours has shape {tuple(ours.shape)}, the reference {tuple(ref.shape)}"
        )
    ours = ours.double().reshape(ref.shape)
    ref = ref.double()
    batch, seqlen = ref.shape[0], ref.shape[1] if ref.dim() > 1 else 1
    diff = (ours - ref).abs().reshape(batch, seqlen, -1)
    ref_abs = ref.abs().reshape(batch, seqlen, -1)
    scale = ref_abs.max().item()
    denom = scale if scale > 0 else 1.0
    per_token_abs = diff.amax(dim=(0, 2))
    per_token_scale = ref_abs.amax(dim=(0, 2)).clamp_min(1e-30)
    significant = ref_abs > 1e-3 * denom
    mismatched = (
        torch.sign(ours).reshape(batch, seqlen, -1) != torch.sign(ref).reshape(batch, seqlen, -1)
    ) & significant
    count = significant.sum().item()
    max_abs = diff.max().item() if diff.numel() else 0.0
    match = _LAYER_RE.match(name)
    return StageDiff(
        name=name,
        layer=int(match.group(1)) if match else None,
        stage=match.group(2) if match else name,
        shape=list(ref.shape),
        max_abs=max_abs,
        max_rel=max_abs / denom,
        sign_mismatch_pct=100.0 * mismatched.sum().item() / count if count else 0.0,
        worst_token=int(per_token_abs.argmax().item()) if per_token_abs.numel() else 0,
        diverged=max_abs / denom > tolerance,
        per_token_max_abs=per_token_abs.tolist(),
        per_token_max_rel=(per_token_abs / per_token_scale).tolist(),
    )


def compare_stages(
    ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], *, tolerance: float, mode: str = "full"
) -> CompareReport:
    """Diff every stage present on both sides, in data-flow order."""
    common = sorted(set(ours) & set(reference), key=stage_order)
    rows = [diff_stage(name, ours[name], reference[name], tolerance) for name in common]
    return CompareReport(
        rows=rows,
        tolerance=tolerance,
        mode=mode,
        only_ours=sorted(set(ours) - set(reference), key=stage_order),
        only_reference=sorted(set(reference) - set(ours), key=stage_order),
    )


# ==================================================================== our side
@torch.no_grad()
def run_ours(
    model: nn.Module, input_ids: torch.Tensor, *, token_by_token: bool = False
) -> dict[str, torch.Tensor]:
    """Stages of our model. input_ids: (batch, seqlen). token_by_token: one call per token through the
    inference cache (the decode kernels after the first token), stages concatenated along seqlen."""
    model.eval()
    if not token_by_token:
        with tracing() as stages:
            model(input_ids)
        return dict(stages)
    cache = model.allocate_cache(input_ids.shape[0])
    steps = []
    for t in range(input_ids.shape[1]):
        with tracing() as stages:
            model(input_ids[:, t : t + 1], cache=cache)
        steps.append(dict(stages))
    return _concat_steps(steps)


def _concat_steps(steps: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    names = set(steps[0])
    for step in steps[1:]:
        names &= set(step)
    return {name: torch.cat([step[name] for step in steps], dim=1) for name in names}


# ==================================================================== transformers side
class _Recorder:
    """Collects reference stages; ``layer`` is the index of the decoder layer running now."""

    def __init__(self) -> None:
        self.stages: dict[str, torch.Tensor] = {}
        self.layer: int | None = None
        self.seqlen = 0  # tokens in the current call: a cached conv also returns its past window
        self.pending_experts: torch.Tensor | None = None

    def put(self, name: str, value: torch.Tensor, *, layer: int | None | str = "current") -> None:
        """layer: an index, None for a model-level stage, or "current" for the running layer."""
        layer = self.layer if layer == "current" else layer
        key = name if layer is None else f"layers.{layer}.{name}"
        value = value.detach()
        self.stages[key] = value.clone() if value.dtype == torch.float64 else value.float().clone()


@contextlib.contextmanager
def _patched(module: Any, name: str, wrapper_factory) -> Iterator[None]:
    """Replace ``module.name`` by ``wrapper_factory(original)`` for the block (if it exists)."""
    original = getattr(module, name, None)
    if original is None:
        yield
        return
    setattr(module, name, wrapper_factory(original))
    try:
        yield
    finally:
        setattr(module, name, original)


def _hook_transformers(hf_model: nn.Module, model_type: str, rec: _Recorder) -> contextlib.ExitStack:
    """Register hooks and function wrappers that record the reference's stages under our names."""
    stack = contextlib.ExitStack()

    def out_hook(name: str, layer: int):
        def hook(_module, _args, output):
            rec.put(name, output[0] if isinstance(output, tuple) else output, layer=layer)

        return hook

    def add(module: nn.Module, hook, *, pre: bool = False, kwargs: bool = False) -> None:
        if pre:
            handle = module.register_forward_pre_hook(hook, with_kwargs=kwargs)
        else:
            handle = module.register_forward_hook(hook)
        stack.callback(handle.remove)

    if model_type in ("mamba", "mamba2"):
        base, layers_attr, mixer_attr = hf_model.backbone, "layers", "mixer"
        final_norm = base.norm_f
    else:
        base, layers_attr, mixer_attr = hf_model.model, "layers", "mamba"
        final_norm = base.norm
    layers = getattr(base, layers_attr)

    def first_input(_module, args, kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states")
        rec.put("embedding", hidden, layer=None)

    add(layers[0], first_input, pre=True, kwargs=True)
    for i, layer in enumerate(layers):

        def set_layer(_module, args, kwargs, i=i):
            rec.layer = i
            hidden = args[0] if args else kwargs.get("hidden_states")
            rec.seqlen = hidden.shape[1]

        add(layer, set_layer, pre=True, kwargs=True)
        add(layer, out_hook("mlp_residual" if model_type == "granitemoehybrid" else "residual", i))
        if model_type in ("mamba", "mamba2"):
            add(layer.norm, out_hook("in_norm", i))
        else:
            add(layer.input_layernorm, out_hook("in_norm", i))
            add(layer.post_attention_layernorm, out_hook("mlp_norm", i))

            def residual_from_norm_input(_module, args, i=i):
                rec.put("residual", args[0], layer=i)

            add(layer.post_attention_layernorm, residual_from_norm_input, pre=True)

            # Our "mlp" stage is shared MLP + experts; transformers runs the experts first.
            def experts_out(_module, _args, output, i=i):
                rec.pending_experts = output

            def shared_out(_module, _args, output, i=i):
                extra = rec.pending_experts
                rec.pending_experts = None
                rec.put("mlp", output if extra is None else output + extra, layer=i)

            if getattr(layer, "block_sparse_moe", None) is not None:
                add(layer.block_sparse_moe, experts_out)
            add(layer.shared_mlp, shared_out)
        mixer = getattr(layer, mixer_attr, None)
        if mixer is not None:
            add(mixer.in_proj, out_hook("in_proj", i))
            add(mixer.out_proj, out_hook("out_proj", i))
            if model_type != "mamba":

                def norm_inputs(_module, args, kwargs, i=i):
                    gate = args[1] if len(args) > 1 else kwargs.get("gate")
                    if gate is not None:
                        rec.put("gate", gate, layer=i)

                add(mixer.norm, norm_inputs, pre=True, kwargs=True)
                add(mixer.norm, out_hook("norm", i))
        attn = getattr(layer, "self_attn", None)
        if attn is not None:
            for proj in ("q", "k", "v"):
                add(getattr(attn, f"{proj}_proj"), out_hook(proj, i))

            def attn_out(_module, args, i=i):
                rec.put("attn_out", args[0], layer=i)

            add(attn.o_proj, attn_out, pre=True)
            add(attn.o_proj, out_hook("out_proj", i))

    def final_hook(_module, _args, output):
        rec.put("final_norm", output, layer=None)

    add(final_norm, final_hook)

    # Stages computed inside functional code: wrap the functions the mixers call.
    module_name = {"mamba": "mamba", "mamba2": "mamba2", "granitemoehybrid": "granitemoehybrid"}[model_type]
    modeling = importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}")

    def conv_wrapper(original):
        def wrapped(hidden_states, *args, **kwargs):
            out = original(hidden_states, *args, **kwargs)
            rec.put("conv1d", out[..., -rec.seqlen :].transpose(1, 2))
            return out

        return wrapped

    def conv_update_wrapper(original):
        def wrapped(hidden_states, *args, **kwargs):
            out = original(hidden_states, *args, **kwargs)
            rec.put("conv1d", out.transpose(1, 2) if out.dim() == 3 else out[:, None])
            return out

        return wrapped

    stack.enter_context(_patched(modeling, "causal_conv1d_fn", conv_wrapper))
    stack.enter_context(_patched(modeling, "causal_conv1d_update", conv_update_wrapper))
    if model_type == "mamba":

        def scan_wrapper(original):
            def wrapped(u, dt, A, B, C, *args, **kwargs):
                for name, value in (("x", u), ("dt", dt), ("B", B), ("C", C)):
                    rec.put(name, value.transpose(1, 2))
                if kwargs.get("z") is not None:
                    rec.put("gate", kwargs["z"].transpose(1, 2))
                out = original(u, dt, A, B, C, *args, **kwargs)
                rec.put("ssm_out", (out[0] if isinstance(out, tuple) else out).transpose(1, 2))
                return out

            return wrapped

        def step_wrapper(original):
            def wrapped(state, x, dt, A, B, C, *args, **kwargs):
                for name, value in (("x", x), ("dt", dt), ("B", B), ("C", C)):
                    rec.put(name, value[:, None])
                if kwargs.get("z") is not None:
                    rec.put("gate", kwargs["z"][:, None])
                out = original(state, x, dt, A, B, C, *args, **kwargs)
                rec.put("ssm_out", out[:, None])
                return out

            return wrapped

        stack.enter_context(_patched(modeling, "mamba_selective_scan", scan_wrapper))
        stack.enter_context(_patched(modeling, "mamba_selective_state_update", step_wrapper))
    else:

        def chunk_wrapper(original):
            def wrapped(x, dt, A, B, C, *args, **kwargs):
                b, l = x.shape[:2]
                rec.put("x", x.reshape(b, l, -1))
                rec.put("dt", dt)
                rec.put("B", B.reshape(b, l, -1))
                rec.put("C", C.reshape(b, l, -1))
                out = original(x, dt, A, B, C, *args, **kwargs)
                y = out[0] if isinstance(out, tuple) else out
                rec.put("ssm_out", y.reshape(b, l, -1))
                return out

            return wrapped

        def step_wrapper(original):
            def wrapped(state, x, dt, A, B, C, *args, **kwargs):
                b = x.shape[0]
                rec.put("x", x.reshape(b, 1, -1))
                rec.put("dt", dt[:, :, 0].reshape(b, 1, -1))  # per-head dt, broadcast over headdim
                rec.put("B", B.reshape(b, 1, -1))
                rec.put("C", C.reshape(b, 1, -1))
                out = original(state, x, dt, A, B, C, *args, **kwargs)
                rec.put("ssm_out", out.reshape(b, 1, -1))
                return out

            return wrapped

        stack.enter_context(_patched(modeling, "mamba2_chunk_scan", chunk_wrapper))
        stack.enter_context(_patched(modeling, "mamba2_selective_state_update", step_wrapper))
    return stack


def load_transformers_model(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, str]:
    """The ``transformers`` causal LM of a local folder, and its model_type (imports transformers lazily)."""
    try:
        import transformers
    except ImportError as err:
        raise RuntimeError(
            "the 'transformers' reference needs the transformers package: pip install transformers "
            "(or compare against a saved dump with --reference FILE)"
        ) from err
    model_type = json.loads((Path(path) / "config.json").read_text()).get("model_type")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    return model.eval(), model_type


@torch.no_grad()
def run_transformers(
    hf_model: nn.Module, model_type: str, input_ids: torch.Tensor, *, token_by_token: bool = False
) -> dict[str, torch.Tensor]:
    """Stages of a ``transformers`` model under our stage names (see module docstring)."""
    if not token_by_token:
        rec = _Recorder()
        with _hook_transformers(hf_model, model_type, rec):
            logits = hf_model(input_ids=input_ids, use_cache=False).logits
        rec.put("logits", logits, layer=None)
        return rec.stages
    steps = []
    cache = None
    cache_kw = "past_key_values" if model_type == "granitemoehybrid" else "cache_params"
    for t in range(input_ids.shape[1]):
        rec = _Recorder()
        with _hook_transformers(hf_model, model_type, rec):
            out = hf_model(input_ids=input_ids[:, t : t + 1], use_cache=True, **{cache_kw: cache})
        cache = getattr(out, cache_kw, None)
        if cache is None:
            cache = getattr(out, "past_key_values", None) or getattr(out, "cache_params", None)
        rec.put("logits", out.logits, layer=None)
        steps.append(rec.stages)
    return _concat_steps(steps)


# ==================================================================== dumps
def save_dump(
    stages: dict[str, torch.Tensor], path: str | os.PathLike, *, input_ids: torch.Tensor | None = None
) -> None:
    """Write stages as safetensors (``.safetensors``) or JSON (anything else), atomically."""
    from ssmkit.models.config import atomic_write_text

    path = Path(path)
    if path.suffix == ".safetensors":
        import tempfile

        from safetensors.torch import save_file

        metadata = {"input_ids": json.dumps(input_ids.tolist())} if input_ids is not None else None
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        save_file({k: v.contiguous() for k, v in stages.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
        return
    data: dict[str, Any] = {"stages": {k: v.tolist() for k, v in stages.items()}}
    if input_ids is not None:
        data["input_ids"] = input_ids.tolist()
    atomic_write_text(path, json.dumps(data))


def load_dump(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Stages (and the input ids, when recorded) from a JSON or safetensors dump.

    JSON: ``{"stages": {name: nested list (batch, seqlen, ...)}, "input_ids": [[...]]}`` or a
    plain ``{name: nested list}``; safetensors: one tensor per stage, input ids in the metadata.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference dump {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            stages = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            meta = f.metadata() or {}
        ids = torch.tensor(json.loads(meta["input_ids"])) if "input_ids" in meta else None
        return stages, ids
    data = json.loads(path.read_text())
    raw = data.get("stages", data)
    stages = {k: torch.tensor(v, dtype=torch.float64) for k, v in raw.items() if k != "input_ids"}
    ids = torch.tensor(data["input_ids"]) if "input_ids" in data else None
    return stages, ids


# ==================================================================== top level
def compare_checkpoint(
    path: str | os.PathLike,
    input_ids: torch.Tensor,
    *,
    reference: str = "transformers",
    reference_path: str | os.PathLike | None = None,
    token_by_token: bool = False,
    tolerance: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> CompareReport:
    """Load our model from ``path`` and diff it against ``reference``: ``"transformers"`` (the
    transformers model of ``reference_path``, default ``path``) or the path of a dump file."""
    from ssmkit.models import LanguageModel

    model = LanguageModel.from_pretrained(path, dtype=dtype).eval()
    ours = run_ours(model, input_ids, token_by_token=token_by_token)
    if reference == "transformers":
        hf_model, model_type = load_transformers_model(reference_path or path, dtype=dtype)
        ref = run_transformers(hf_model, model_type, input_ids, token_by_token=token_by_token)
    else:
        ref, _ = load_dump(reference)
    tol = tolerance if tolerance is not None else DEFAULT_TOLERANCE.get(dtype, 1e-4)
    return compare_stages(ours, ref, tolerance=tol, mode="tokens" if token_by_token else "full")
