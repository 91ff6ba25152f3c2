"""Runs a checkpoint one decoder layer at a time, with transformers' own layer classes.

Only the skeleton of the whole model is ever built, on the meta device (no memory); each decoder layer is then
instantiated alone, filled with its tensors from the source, run, and dropped. Using transformers' layers keeps
qconv's forward pass identical to what loaders of the written artifacts compute.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from qconv.errors import InputError
from qconv.model.source import TensorSource
from qconv.stats import StopForward


def hf_config(config: dict):
    """A transformers config object from a config dict, attention through SDPA (exact on CPU, fast on GPU)."""
    import transformers

    cls = transformers.CONFIG_MAPPING[config["model_type"]]
    cfg = cls.from_dict({k: v for k, v in config.items() if k not in ("quantization_config",)})
    cfg._attn_implementation = "sdpa"
    return cfg


MIXED = "bfloat16-mixed"


def compute_mode(device: torch.device, name: str = "auto") -> tuple[torch.dtype, torch.dtype | None]:
    """(activation dtype, autocast dtype or None) for a ``--compute-dtype`` name.

    ``bfloat16-mixed``: activations, residual stream, norms and statistics in float32, matmuls and attention in
    bfloat16 under ``torch.autocast`` — bf16's speed on CPUs with AVX512-BF16/AMX (and GPUs) without carrying the
    residual stream in bf16 through every layer."""
    if name == MIXED:
        return torch.float32, torch.bfloat16
    return compute_dtype(device, name, option="--compute-dtype", also=(MIXED,)), None


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def compute_dtype(
    device: torch.device, name: str = "auto", option: str = "--dtype", also: tuple[str, ...] = ()
) -> torch.dtype:
    """float32 on CPU; bfloat16 on GPUs unless asked (``name``: auto, float32, bfloat16, float16).

    CPU kernels are fastest and exact in float32; on GPU bf16 halves activation memory for large models.
    ``option``/``also``: the command-line option the name came from and its other accepted values (for the error)."""
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if name not in _DTYPES:
        *head, tail = ["auto", *_DTYPES, *also]
        raise InputError(f"{option} {name}: choose {', '.join(head)} or {tail}")
    return _DTYPES[name]


def load_weights(source: TensorSource, i: int, device: torch.device, dtype: torch.dtype | None = None) -> nn.Module:
    """Decoder layer ``i``'s tensors as a bare module tree (``layer.get_submodule("self_attn.q_proj").weight``),
    on ``device``, in ``dtype`` or as stored. No forward pass and no transformers: what a method needs when nothing
    runs through the layer (no calibration), at none of the cost of building the real layer class."""
    prefix = source.adapter.layer_prefix(i)
    root = nn.Module()
    stored = source.read_many(source.layer_tensor_names(i))
    for name in list(stored):
        *path, leaf = name[len(prefix) :].split(".")
        m = root
        for part in path:
            if not hasattr(m, part):
                m.add_module(part, nn.Module())
            m = getattr(m, part)
        t = stored.pop(name).to(device, dtype)  # popped: a converted copy replaces the stored tensor, not joins it
        m.register_parameter(leaf, nn.Parameter(t, requires_grad=False))
    return root


class LayerRunner:
    """Embedding, decoder layers and head of a model, materialised one at a time from ``source``.

    device/dtype: where and in which float dtype layers compute (activations use the same dtype); autocast: a lower
    precision the layers' matmuls and attention run in (``torch.autocast``), or None.
    """

    def __init__(
        self,
        source: TensorSource,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        autocast: torch.dtype | None = None,
    ):
        import transformers

        self.source = source
        self.device = torch.device(device)
        self.dtype = dtype
        self.autocast = autocast
        self.cfg = hf_config(source.config)
        with torch.device("meta"):
            skeleton = transformers.AutoModelForCausalLM.from_config(self.cfg)
        inner = skeleton.model
        self._layer_cls = type(inner.layers[0])
        self._norm_cls = type(inner.norm)
        # Built on the default device (not meta) so its inverse frequencies are real numbers; the constructor's
        # signature varies across transformers releases, config is the one stable argument.
        with torch.device("cpu"):
            self.rotary = type(inner.rotary_emb)(config=self.cfg)
        self.rotary.to(self.device)
        self.layer_types = list(getattr(self.cfg, "layer_types", None) or ["full_attention"] * source.num_layers)
        del skeleton
        self._embed: torch.Tensor | None = None

    # -- pieces ---------------------------------------------------------------------------------------------------

    def embed_weight(self) -> torch.Tensor:
        if self._embed is None:
            self._embed = self.source.read(self.source.adapter.embed)
        return self._embed

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """int64 [B, T] → hidden [B, T, H] in the compute dtype on the compute device."""
        w = self.embed_weight()
        return F.embedding(input_ids.cpu(), w).to(self.device, self.dtype)

    def load_layer(
        self, i: int, overrides: dict[str, torch.Tensor] | None = None, dtype: torch.dtype | None = None
    ) -> nn.Module:
        """Decoder layer ``i`` with its weights (``overrides`` replace named tensors, e.g. dequantized ones).
        ``dtype`` overrides the compute dtype (a layer only holding weights for a method can stay in bf16)."""
        prefix = self.source.adapter.layer_prefix(i)
        with torch.device("meta"):
            layer = self._layer_cls(self.cfg, i)
        if self.source.adapter.experts is not None:
            from qconv.model.experts import unfuse_experts

            unfuse_experts(layer, self.source.adapter.experts)
        overrides = overrides or {}
        names = self.source.layer_tensor_names(i)
        stored = self.source.read_many([n for n in names if n not in overrides])
        state = {}
        for n in names:
            t = overrides[n] if n in overrides else stored.pop(n)
            state[n[len(prefix) :]] = t.to(self.device, dtype or self.dtype)
        layer.load_state_dict(state, strict=True, assign=True)
        return layer.eval()

    def final_norm(self) -> nn.Module:
        w = self.source.read(self.source.adapter.final_norm)
        norm = self._norm_cls(w.shape[0], eps=self.cfg.rms_norm_eps)
        norm.weight = nn.Parameter(w.to(self.device, self.dtype), requires_grad=False)
        return norm.eval()

    def lm_head_weight(self) -> torch.Tensor:
        a = self.source.adapter
        return self.embed_weight() if self.source.tied else self.source.read(a.lm_head)

    # -- running --------------------------------------------------------------------------------------------------

    def _context(self, h: torch.Tensor) -> dict:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        pos = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
        kwargs = dict(config=self.cfg, inputs_embeds=h, attention_mask=None, past_key_values=None, position_ids=pos)
        masks = {"full_attention": create_causal_mask(**kwargs)}
        if "sliding_attention" in self.layer_types:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
        return {"key": (tuple(h.shape[:2]), h.device), "pos": pos, "masks": masks, "rope": self.rotary(h, pos)}

    @torch.no_grad()
    def forward_layer(self, layer: nn.Module, i: int, h: torch.Tensor, ctx: dict | None = None) -> torch.Tensor:
        """One decoder layer on hidden states [B, T, H] → [B, T, H]."""
        ctx = ctx or self._context(h)
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            out = layer(
                h,
                attention_mask=ctx["masks"][self.layer_types[i]],
                position_ids=ctx["pos"],
                position_embeddings=ctx["rope"],
            )
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def run(
        self,
        layer: nn.Module,
        i: int,
        hidden: torch.Tensor,
        batch_size: int,
        into: torch.Tensor | None = None,
        keep: bool = True,
    ) -> torch.Tensor | None:
        """Run all samples of ``hidden`` [N, T, H] through ``layer`` in micro-batches. Outputs go to ``into``
        (may be ``hidden`` itself, updating in place) or a new tensor; ``keep=False`` discards them (a pass run
        only for the statistics its hooks collect)."""
        out = (into if into is not None else torch.empty_like(hidden)) if keep else None
        ctx = None
        for b in range(0, hidden.shape[0], batch_size):
            x = hidden[b : b + batch_size].to(self.device, self.dtype)
            if ctx is None or ctx["key"] != (tuple(x.shape[:2]), x.device):
                ctx = self._context(x)
            try:
                y = self.forward_layer(layer, i, x, ctx)
            except StopForward:  # a collector has all it needs from this batch (only without kept outputs)
                if keep:
                    raise
                continue
            if out is not None:
                out[b : b + batch_size] = y.to(out.device, out.dtype)
        return out


def iter_batches(n: int, batch_size: int) -> Iterator[slice]:
    for b in range(0, n, batch_size):
        yield slice(b, min(n, b + batch_size))


def logits_fn(runner: LayerRunner) -> Callable[[torch.Tensor], torch.Tensor]:
    """final norm + lm_head as a function of the last hidden states [B, T, H] → float32 logits [B, T, V]."""
    norm = runner.final_norm()
    head = runner.lm_head_weight().to(runner.device, runner.dtype)

    def f(h: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return F.linear(norm(h.to(runner.device, runner.dtype)), head).float()

    return f
