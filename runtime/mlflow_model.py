"""spon's sparse model as an MLflow `python_function` model, from code.

This file is the model (MLflow's models-from-code): `spon publish` / the flow's publish stage log
a copy of it with every registered version, beside the fused checkpoint (safetensors + JSON,
the files the model store holds) as the artifact `fused_model`. `mlflow.pyfunc.load_model` and
`mlflow models serve` execute it: it loads the checkpoint through spon's own loader, as the sparse
model in spon mode (spon's kernels on where they apply: CPU and CUDA, not on quantized weights),
and generates. Nothing is unpickled. What it needs installed: `mlflow` and the spon wheel (which
brings torch, transformers, safetensors; torchao for the int8/int4 variants).

Input: a list of prompts. Output: one text per prompt, the prompt and its continuation decoded
as `spon generate` prints it (greedy unless `do_sample`). Params: max_new_tokens, temperature,
do_sample. A bad request (empty prompt, a non-positive token count, a prompt + continuation longer
than the model's context) raises MlflowException(INVALID_PARAMETER_VALUE): the scoring server
answers 400 with the message.

Device: $SPON_DEVICE, else the model config's `device`, else CUDA when available, else CPU.
Kernels: on unless $SPON_KERNELS=0 (or the model config's `kernels` is false).
No `from __future__ import annotations`: MLflow reads predict's type hints as the signature.
"""

import os
import threading

import mlflow
from mlflow.pyfunc import PythonModel

CHECKPOINT = "fused_model"  # the artifact key of the checkpoint directory
DEFAULT_PARAMS = {"max_new_tokens": 24, "temperature": 1.0, "do_sample": False}  # = `spon generate`'s defaults
MAX_PROMPTS = 256  # one request's batch


def _bad_request(message: str):
    from mlflow.exceptions import MlflowException

    return MlflowException.invalid_parameter_value(message)


class SponSparseModel(PythonModel):
    """The fused spon checkpoint, sparse, behind pyfunc's predict(list[str]) -> list[str]."""

    def load_context(self, context):
        from pathlib import Path

        import torch

        from spon import load_sparse_model, use_kernels
        from spon.quantize import QUANT_META

        config = dict(context.model_config or {})
        path = Path(context.artifacts[CHECKPOINT])
        device = os.environ.get("SPON_DEVICE") or config.get("device") or "auto"
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.quantized = (path / QUANT_META).is_file()
        if self.quantized:  # spon-int8 / spon-int4: torchao weights, still sparse (spon mode)
            from spon.quantize import load_quantized

            self.model, self.tokenizer, self.meta = load_quantized(path, device)
        else:
            self.model, self.tokenizer, self.meta = load_sparse_model(path, device=device,
                                                                      dtype=os.environ.get("SPON_DTYPE") or config.get("dtype", "fp32"))
        kernels = os.environ.get("SPON_KERNELS", "1") != "0" and bool(config.get("kernels", True))
        # The kernels read the floating-point weights; a quantized model keeps torchao's matmuls.
        self.kernels = kernels and not self.quantized
        if self.kernels:
            use_kernels(self.model, True)
        self.device = device
        self.context_len = getattr(self.model.config, "max_position_embeddings", None)
        # The kernel groups keep per-call state on the model: one generation at a time.
        self._lock = threading.Lock()

    def _params(self, params):
        p = {**DEFAULT_PARAMS, **{k: v for k, v in (params or {}).items() if k in DEFAULT_PARAMS}}
        try:
            n, t, sample = int(p["max_new_tokens"]), float(p["temperature"]), p["do_sample"]
        except (TypeError, ValueError) as e:
            raise _bad_request(f"invalid params: {e}") from None
        if n < 1:
            raise _bad_request(f"max_new_tokens must be >= 1, got {n}")
        if not isinstance(sample, bool):
            raise _bad_request(f"do_sample must be true or false, got {sample!r}")
        if sample and not t > 0:
            raise _bad_request(f"temperature must be > 0 when do_sample is true, got {t}")
        return n, t, sample

    def predict(self, context, model_input: list[str], params: dict | None = None) -> list[str]:
        import torch

        n, temperature, sample = self._params(params)
        prompts = list(model_input)
        if not prompts:
            raise _bad_request("no prompts: send a list of one or more non-empty strings")
        if len(prompts) > MAX_PROMPTS:
            raise _bad_request(f"{len(prompts)} prompts in one request; at most {MAX_PROMPTS}")
        encoded = []
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str) or not prompt.strip():
                raise _bad_request(f"prompt {i} is empty: every prompt must be a non-empty string")
            ids = self.tokenizer(prompt, return_tensors="pt").input_ids
            if self.context_len is not None and ids.shape[1] + n > self.context_len:
                raise _bad_request(f"prompt {i} has {ids.shape[1]} tokens; with max_new_tokens={n} that is more than "
                                   f"the model's context of {self.context_len} tokens")
            encoded.append(ids)
        sampling = {"do_sample": True, "temperature": temperature} if sample else {"do_sample": False}
        texts = []
        with self._lock, torch.no_grad():
            # One prompt at a time: the greedy text of each is exactly `spon generate`'s.
            for ids in encoded:
                ids = ids.to(self.model.device)
                out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, **sampling)
                texts.append(self.tokenizer.decode(out[0], skip_special_tokens=True))
        return texts


mlflow.models.set_model(SponSparseModel())
