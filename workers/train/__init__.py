"""The ``train`` job kind: LoRA or QLoRA (peft) with transformers' Trainer, then the evaluation harness.

``lora`` trains adapters on the float base, or, ``from:`` a gptq/awq stage of backend gptqmodel, on that
checkpoint's frozen int4 layers (peft's GPTQ support, through GPTQModel's torch kernel: float16/bfloat16 only, so
bfloat16 on a CPU), evaluated afterwards on GPTQModel's default int4 kernel with the adapter; ``qlora`` on the
base loaded in bitsandbytes 4-bit (NF4, double quantization). On a quantized base ``base_task_loss`` is that
model's task loss without the adapter: where training started. The adapter is saved under ``<output_dir>/adapter``
(peft's own format, with the tokenizer) and is the job's artifact, which a ``merge`` job reads. What is evaluated
is the model as trained: base (4-bit for QLoRA) plus adapter, unmerged, i.e. the "train and infer on
bitsandbytes" way of serving a QLoRA model.

Sample yaml::

    stages:
      - name: finetune
        kind: train
        method: qlora
        dataset: {path: data/train.jsonl, text_field: text, eval_samples: 32}
        max_steps: 30
        matrix: {r: [8, 64], lora_alpha: [16]}
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from workers.evaluate.harness import PeakMemory, evaluate, reference_first
from workers.quantize.bnb import use_cpu_kernel
from workers.shared.data import encode, examples, split_examples
from workers.shared.files import empty_but
from workers.shared.models import device, dir_bytes, prepared_base, shared_columns, start, tensor_bytes


def bnb_config(opts):
    """The bitsandbytes 4-bit config a QLoRA job (its typed options) trains on, and its dequantized merge reloads."""
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=opts.quant_type,
                              bnb_4bit_use_double_quant=opts.double_quant,
                              bnb_4bit_compute_dtype=getattr(torch, opts.compute_dtype))


def load_trainable_base(path: str, opts, fused_cpu_kernel: bool | None = None, dtype=None, four_bit: bool | None = None):
    """A fresh copy of the base to put adapters on (the worker's cached base stays untouched): float for LoRA
    (in the compute dtype: the checkpoint's on a GPU, float32 on a CPU; ``dtype`` forces one, as a merge's
    float32 check does), bitsandbytes 4-bit for QLoRA (``four_bit``: False for its float base), its CPU kernel
    chosen by ``workers.quantize.bnb.use_cpu_kernel``. Placed over the job's GPUs like every model
    (``workers.shared.models.placement``). ``opts``: the train job's typed options."""
    import torch
    from transformers import AutoModelForCausalLM

    from workers.quantize.bnb import quantized_bytes
    from workers.shared.models import compute_dtype, placement, weight_bytes

    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype or compute_dtype(path)
    if opts.method == "qlora" if four_bit is None else four_bit:
        where, _ = placement(path, nbytes=quantized_bytes(path))
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb_config(opts), dtype=dtype,
                                                     **where)
        use_cpu_kernel(model, fused_cpu_kernel)
        return model
    where, _ = placement(path, nbytes=weight_bytes(path, dtype=dtype))
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **where)


class _Batches:
    """Pads a batch to its longest example; the loss ignores the padding. Counts the tokens it hands out."""

    def __init__(self, pad_id: int):
        self.pad_id, self.tokens = pad_id, 0

    def __call__(self, features: list[dict]) -> dict:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.tensor(f["input_ids"])
            mask[i, :n] = 1
        self.tokens += int(mask.sum())
        labels = ids.masked_fill(mask == 0, -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def run(ctx) -> dict:
    """setup -> train -> save -> evaluate -> row."""
    start(ctx)
    out = Path(ctx.output_dir)
    resume = last_checkpoint(out / "trainer") if ctx.opts.save_steps else None
    clean(out, keep=resume)  # a retried attempt starts clean, but for the checkpoint it resumes from
    with PeakMemory() as mem:
        base, prepare_s, cached = prepared_base(ctx)
        ctx.extra["base_during_job"] = reference_first(ctx, base)
        run = setup(ctx, base)
        if resume is not None:
            run.resumed_from = int(resume.name.split("-")[1])
            run.curve[:] = [[e["step"], float(e["loss"])] for e in
                            json.loads((resume / "trainer_state.json").read_text()).get("log_history", [])
                            if "loss" in e and e.get("step", 0) <= run.resumed_from]
            ctx.progress(f"resuming training at step {run.resumed_from} (the last checkpoint of an earlier attempt)")
        else:
            ctx.progress("training")
        with PeakMemory() as train_mem:
            t0 = time.time()
            run.trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
            train_s = time.time() - t0
        adapter = save(run, base, out)
        run.model.eval()
        quantized = run.quantized
        if quantized:  # trained through the torch kernel; evaluated as served: GPTQModel's default kernel + adapter
            from peft import PeftModel

            from workers.quantize.gptqmodel import load_quantized

            run.trainer = None
            run.model = PeftModel.from_pretrained(load_quantized(quantized), str(adapter)).eval()
            ctx.extra["quantized_base"] = quantized  # what a merge of this adapter dequantizes (onto: dequantized)
        metrics = evaluate(ctx, run.model, base)
        if run.base_bits is not None and "task_loss" in metrics:
            # where the adapter started: the quantized model (GPTQ/AWQ, QLoRA's NF4) without it; for a LoRA on the float
            # base that is ref_task_loss already
            from workers.evaluate.harness import task_metrics

            with run.model.disable_adapter():
                ctx.extra["base_task_loss"] = task_metrics(ctx, run.model, base)["task_loss"]
    result = {**row(run, train_s, train_mem.mb, adapter),
              **shared_columns(ctx, base, size_bytes=tensor_bytes(run.model), size_source="memory", model=run.model,
                               peak_mb=mem.mb, prepare_s=prepare_s, cached=cached, artifact=str(adapter)),
              **ctx.extra, **metrics}
    del run
    return result


def last_checkpoint(folder: Path) -> Path | None:
    """The Trainer checkpoint of the highest step under ``folder`` that is complete (its trainer state, written
    after the adapter, optimizer and scheduler, is there): what a retried attempt resumes from; None if none."""
    steps = []
    for ckpt in folder.glob("checkpoint-*"):
        step = ckpt.name.split("-", 1)[1]
        if step.isdigit() and (ckpt / "trainer_state.json").is_file() and (ckpt / "optimizer.pt").is_file():
            steps.append((int(step), ckpt))
    return max(steps)[1] if steps else None


def clean(out: Path, keep: Path | None) -> None:
    """The job's folder emptied, but for the checkpoint ``keep`` (and the Trainer folder holding it)."""
    empty_but(out, keep.parent if keep is not None else None)
    if keep is not None:
        empty_but(keep.parent, keep)


@dataclass
class _Run:
    """A train job once set up: the peft model, its Trainer, and what the callbacks record."""

    opts: object  # the job's typed options (LoraOptions, QloraOptions)
    model: object
    trainer: object
    collate: _Batches
    train_examples: int
    held_out: int
    trainable: int
    total: int
    curve: list = field(default_factory=list)  # [step, loss] every logged step
    max_steps: list = field(default_factory=lambda: [0])
    resumed_from: int | None = None  # the step an earlier attempt's checkpoint had reached
    base_bits: int | None = None  # the quantized base's bits: QLoRA's NF4 (4) or a GPTQ/AWQ stage's; None: float
    quantized: str | None = None  # that stage's checkpoint (quantized_base)


def peft_targets(names: list[str], model=None):
    """``[all-linear]`` (the default) is peft's own string for every Linear/Conv1D layer but the output head; on a
    GPTQModel base (whose quantized layers are not Linears) it is the names of those layers."""
    if list(names) != ["all-linear"]:
        return list(names)
    if model is None:
        return "all-linear"
    from workers.quantize.gptqmodel import quantized_layers

    return sorted({name.rsplit(".", 1)[-1] for name, _ in quantized_layers(model)}) or "all-linear"


def quantized_base(ctx) -> str | None:
    """The GPTQ/AWQ checkpoint (GPTQModel layout) a LoRA job trains on: the artifact of the quantize job it comes
    from, inside the output root; None for a job on the sweep's float model."""
    parent = ctx.job.input
    if parent.kind != "quantize" or not parent.artifact:
        return None
    from workers.shared.files import inside

    return inside(ctx.output_root, parent.artifact)


def setup(ctx, base) -> _Run:
    """The examples, the base (4-bit for QLoRA) with fresh adapters on it, and a Trainer that reports progress."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import Trainer, TrainingArguments

    opts = ctx.opts
    ctx.progress("reading the training data")
    ds = opts.dataset
    texts = examples(ctx.job.data, ds.text_field or "text", ds.format)
    train_texts, held = split_examples(texts, ds.eval_samples, ds.max_samples)
    features = [{"input_ids": encode(base.tokenizer, t, opts.seq_len)} for t in train_texts]

    quantized = quantized_base(ctx)
    ctx.progress(f"loading the base for {opts.method}" + (" (GPTQModel, torch kernel)" if quantized else ""))
    torch.manual_seed(opts.seed)
    if quantized:
        from workers.quantize.gptqmodel import kernels, load_quantized

        model = load_quantized(quantized, training=True)
        ctx.extra["train_kernel"] = "/".join(kernels(model))
        ctx.extra["train_dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    else:
        model = load_trainable_base(base.path, opts)
    if opts.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=opts.gradient_checkpointing)
    elif opts.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    lora = LoraConfig(r=opts.r, lora_alpha=opts.lora_alpha, lora_dropout=opts.lora_dropout,
                      target_modules=peft_targets(opts.target_modules, model), bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    trainable, total = model.get_nb_trainable_parameters()
    tok = base.tokenizer
    collate = _Batches(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    args = TrainingArguments(
        output_dir=str(Path(ctx.output_dir) / "trainer"), per_device_train_batch_size=opts.batch_size,
        gradient_accumulation_steps=opts.grad_accum, learning_rate=opts.learning_rate,
        max_steps=opts.max_steps or -1, num_train_epochs=opts.epochs, warmup_steps=opts.warmup_steps,
        logging_steps=1, report_to=[], seed=opts.seed, data_seed=opts.seed,
        save_strategy="steps" if opts.save_steps else "no", save_steps=opts.save_steps or 500,
        save_total_limit=2,  # the last two: one is complete even if the attempt died while writing the other
        dataloader_num_workers=0, disable_tqdm=True, remove_unused_columns=False,
        use_cpu=device() == "cpu", gradient_checkpointing=False,  # set on the model above, as chosen
    )
    run = _Run(opts, model, None, collate, len(features), len(held), trainable, total,
               base_bits=4 if opts.method == "qlora" else ctx.job.input.opts.bits if quantized else None,
               quantized=quantized)
    run.trainer = Trainer(model=model, args=args, train_dataset=features, data_collator=collate,
                          callbacks=[_progress_callback(ctx, run)])
    return run


def _progress_callback(ctx, run: _Run):
    """A Trainer callback that records the loss of every step in ``run.curve`` and says it as progress."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            run.max_steps[0] = state.max_steps

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                run.curve.append([state.global_step, float(logs["loss"])])
                ctx.progress(f"training step {state.global_step}/{state.max_steps} loss {logs['loss']:.4f}")

    return Progress()


def save(run: _Run, base, out: Path) -> Path:
    """The adapter (peft format, with the tokenizer) and the loss curve; the Trainer's scratch folder removed."""
    adapter = out / "adapter"
    run.model.save_pretrained(adapter)
    base.tokenizer.save_pretrained(adapter)
    (out / "loss_curve.json").write_text(json.dumps(run.curve))
    shutil.rmtree(out / "trainer", ignore_errors=True)
    return adapter


def row(run: _Run, train_s: float, train_peak_mb: float, adapter: Path) -> dict:
    """What training measured: the adapter's size, the loss, the cost."""
    opts, steps = run.opts, run.max_steps[0] or len(run.curve)
    losses = [loss for _, loss in run.curve]
    tokens = run.collate.tokens
    return {
        "method": opts.method,
        "bits": run.base_bits,
        "r": opts.r,
        "lora_alpha": opts.lora_alpha,
        "lora_dropout": opts.lora_dropout,
        "trainable_params": run.trainable,
        "trainable_pct": 100.0 * run.trainable / run.total,
        "train_examples": run.train_examples,
        "held_out_examples": run.held_out,
        "train_steps": steps,
        "train_s": train_s,
        "step_s": train_s / max(steps, 1),
        "train_tokens": tokens,
        "train_tokens_per_s": tokens / train_s if train_s else None,
        "train_loss": losses[-1] if losses else None,
        "train_loss_first": losses[0] if losses else None,
        "train_loss_best": min(losses) if losses else None,
        "loss_curve": run.curve,
        "resumed_from": run.resumed_from,
        "train_peak_mem_mb": train_peak_mb,
        "adapter_mb": dir_bytes(str(adapter)) / 2**20,
    }
