"""Chat: multi-turn conversations for decoder-only LLMs, trained on every assistant turn.

An example is a conversation: a ``messages`` list of ``{role, content}`` (roles ``system``, ``user``,
``assistant``), or an instruction row (``instruction``, optional ``input``, ``output``: one user turn and the
answer). The tokenizer's chat template renders it; the loss covers the tokens of every assistant turn (its
content and the template's end-of-turn marker) and nothing else. Evaluation and predict generate the last
assistant turn from the conversation before it and score it like text-to-text.

How the assistant tokens are found, for any template: the conversation is rendered prefix by prefix
(``messages[:i]`` with the generation prompt, where assistant turn ``i`` starts; ``messages[:i + 1]`` without,
where it ends), every rendering must be the start of the whole one (else the template rewrites earlier turns
and the task refuses it), and the whole text is tokenised once: a token trains when it starts inside an
assistant span. The span ends at the end of the turn's rendering without its trailing whitespace, so the
end-of-turn token trains and a newline the template puts after it does not.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from multitune.config.parse import field
from multitune.errors import ConfigError, DataError, InputError, MultituneError
from multitune.tasks.base import IGNORE_INDEX, TASKS, ExportSpec, where
from multitune.tasks.text2text import Text2TextConfig, Text2TextTask

logger = logging.getLogger("multitune.tasks")

ROLES = ("system", "user", "assistant")


def _fixed(value: Any) -> Any:
    """A text-to-text setting that a chat task does not have: it keeps ``value`` and is no key of the task's
    config (nor of the saved config.yaml)."""
    return dataclasses.field(default=value, init=False, repr=False, compare=False, metadata={"internal": True})


@dataclass
class ChatConfig(Text2TextConfig):
    """The settings of text2text (generation, label set, decoding, label smoothing, metrics) and a system
    prompt. A conversation has no single source to prefix, is always wrapped in the chat template and trains
    every assistant turn whole, so ``prefix``, ``chat_template`` and ``max_target_length`` are fixed here, not
    keys of a chat task."""

    prefix: str = _fixed("")
    max_target_length: int = _fixed(64)
    chat_template: bool = _fixed(True)
    system: str | None = field(None, help="system prompt added to every conversation that has none (null: only "
                                          "what the data and the chat template give)")

    def validate(self, path: str) -> None:
        inherited = getattr(super(), "validate", None)  # the text-to-text checks, where there are any
        if callable(inherited):
            inherited(path)
        if self.system is not None and not self.system.strip():
            raise ConfigError(f"{path}.system", "is empty; leave it out for no system prompt")


def conversation_problem(messages: Any, need_assistant: bool) -> str | None:
    """What is wrong with a list of messages, or None when it is a conversation a chat task can use.

    A conversation is a non-empty list of ``{role, content}`` mappings: roles ``system`` (first only),
    ``user`` and ``assistant``, contents non-empty strings, and a user turn before the first assistant turn. A
    conversation that ends with a user turn asks for an answer (a prediction input).

    Args:
        messages: the value to check.
        need_assistant: it must end with an assistant turn (training and evaluation examples).

    Returns:
        A message naming the bad item (``messages[2].role: ...``), or None.
    """
    if not isinstance(messages, list) or not messages:
        got = "an empty list" if isinstance(messages, list) else type(messages).__name__
        return f"messages: expected a list of {{role, content}} messages, got {got}"
    seen_user = False
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            return f"messages[{i}]: expected a {{role, content}} mapping, got {type(msg).__name__}"
        for key in ("role", "content"):
            if key not in msg:
                return f"messages[{i}]: no {key!r} (a message is {{role, content}}; keys found: " \
                       f"{', '.join(map(str, msg)) or 'none'})"
        role, content = msg["role"], msg["content"]
        if role not in ROLES:
            return f"messages[{i}].role: unknown role {role!r}; expected one of {', '.join(ROLES)}"
        if not isinstance(content, str):
            return f"messages[{i}].content: expected a string, got {type(content).__name__}"
        if not content.strip():
            return f"messages[{i}].content: is empty"
        if role == "system" and i > 0:
            return f"messages[{i}]: a system message comes first, before the conversation"
        if role == "assistant" and not seen_user:
            return f"messages[{i}]: an assistant turn before any user turn; a conversation starts with a user turn"
        seen_user = seen_user or role == "user"
    if not seen_user:
        return "messages: no user turn"
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        return "messages: no assistant turn; a training or evaluation conversation needs one (its answers)"
    if need_assistant and messages[-1]["role"] != "assistant":
        return f"messages[{len(messages) - 1}]: a {messages[-1]['role']} turn after the last answer; a training or " \
               f"evaluation conversation ends with an assistant turn"
    return None


def _at(example: dict) -> str:
    """Where an example is, for a message: ``FILE:LINE``, or ``FILE`` (``<input>`` for a prediction input)."""
    file, line = where(example)
    return file if line is None else f"{file}:{line}"


def instruction_messages(instruction: str, input_text: str | None, output: str | None) -> list[dict]:
    """An instruction row as a conversation: the user turn is the instruction, followed by a blank line and
    the input when there is one; the assistant turn is the output (none when the output is None)."""
    user = instruction if not (input_text and input_text.strip()) else f"{instruction}\n\n{input_text}"
    messages = [{"role": "user", "content": user}]
    if output is not None:
        messages.append({"role": "assistant", "content": output})
    return messages


@TASKS.register("chat")
class ChatTask(Text2TextTask):
    """Multi-turn chat fine-tuning of a decoder-only LLM: the loss on every assistant turn, evaluation by
    generating the last one.

    A subclass of :class:`Text2TextTask` because a chat task *is* text-to-text whose source is a conversation:
    generation, decoding, the metrics (``bleu``/``chrf``/``exact_match``, or ``accuracy``/``macro_f1``/
    ``invalid`` when the last answers form a label set), label scoring and the export are the same; only how
    an example becomes tokens differs (:meth:`encode`), and what its target is (the last assistant message).
    The free-text main metric is ``chrf``, not ``bleu``: assistant answers are often a few words, and corpus
    BLEU of answers shorter than four words is 0 however many are right.
    """

    config_class = ChatConfig
    main_metric = "chrf"
    fields = ("messages", "instruction", "input", "output")
    required = ()
    text_inputs = False  # prediction inputs are message lists, checked here

    def __init__(self, name: str, config: ChatConfig):
        super().__init__(name, config)
        self.config: ChatConfig = config

    def bind(self, architecture, tokenizer) -> None:
        if not architecture.causal:
            raise ConfigError(f"tasks.{self.name}.type", f"chat needs a decoder_only backbone (a causal LM with a "
                                                         f"chat template), not {architecture.type_name}")
        super().bind(architecture, tokenizer)
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"tasks.{self.name}.type", "chat needs a tokenizer with a chat template (an instruct "
                                                         "or chat model); this backbone's tokenizer has none")

    # -- examples --------------------------------------------------------------------
    def conversation(self, example: dict, need_assistant: bool = True) -> list[dict]:
        """The example's messages (``{role, content}`` only), with the configured system prompt when it has
        none.

        Raises:
            DataError: (file:line) no messages and no instruction, or a conversation that
                :func:`conversation_problem` rejects.
        """
        file, line = where(example)
        if example.get("messages") is not None:
            messages = example["messages"]
        elif example.get("instruction") is not None:
            for key in ("instruction", "output"):
                if example.get(key) is None and (key == "instruction" or need_assistant):
                    raise DataError(file, f"{key}: missing; an instruction row needs its instruction and, to "
                                          f"train or evaluate, its output", line)
                if example.get(key) is not None and not example[key].strip():
                    raise DataError(file, f"{key}: is empty", line)
            messages = instruction_messages(example["instruction"], example.get("input"), example.get("output"))
        else:
            raise DataError(file, "no conversation: expected a messages column (a list of {role, content}), or "
                                  "instruction and output columns (map others with messages: or instruction:, "
                                  "input:, output:)", line)
        problem = conversation_problem(messages, need_assistant)
        if problem:
            raise DataError(file, problem, line)
        out = [{"role": m["role"], "content": m["content"]} for m in messages]
        if self.config.system and out[0]["role"] != "system":
            out.insert(0, {"role": "system", "content": self.config.system})
        return out

    def target(self, example: dict) -> str:
        """The content of the example's last assistant turn (what evaluation generates)."""
        return next(m["content"] for m in reversed(self.conversation(example)) if m["role"] == "assistant")

    def setup(self, train_examples: Sequence[dict]) -> None:
        super().setup([{"target": self.target(ex).strip()} for ex in train_examples])

    def check_examples(self, examples: Sequence[dict]) -> None:
        for ex in examples:
            self.conversation(ex)

    def example_from_input(self, item: Any) -> dict:
        """A prediction input as an example: a list of messages, ``{"messages": [...]}``, an instruction row
        ``{"instruction", "input"}``, ``{"text": ...}`` or a plain string (one user turn).

        Raises:
            InputError: another type, or messages that are not a conversation.
        """
        if isinstance(item, str):
            messages: Any = [{"role": "user", "content": item}]
        elif isinstance(item, list):
            messages = item
        elif isinstance(item, Mapping) and "messages" in item:
            messages = item["messages"]
        elif isinstance(item, Mapping) and isinstance(item.get("instruction"), str):
            messages = instruction_messages(item["instruction"], item.get("input"), item.get("output"))
        elif isinstance(item, Mapping) and isinstance(item.get("text"), str):
            messages = [{"role": "user", "content": item["text"]}]
        else:
            raise InputError(f"expected a list of {{role, content}} messages, {{'messages': [...]}} or a text, "
                             f"got {type(item).__name__}")
        problem = conversation_problem(messages, need_assistant=False)
        if problem:
            raise InputError(problem)
        return {"messages": messages}

    # -- tokens ----------------------------------------------------------------------
    def encode(self, examples: Sequence[dict], tokenizer: Any, max_length: int) -> list[dict]:
        return [self.encode_conversation(self.conversation(ex, need_assistant=False), max_length, ex)
                for ex in examples]

    def encode_conversation(self, messages: list[dict], max_length: int, example: dict | None = None) -> dict:
        """One conversation as a decoder-only feature: ``input_ids``, ``prompt_length`` (the tokens before
        the last assistant turn's content, generation prompt included) and, when it ends with an assistant
        turn, ``labels`` (the ids of assistant tokens, -100 elsewhere). A conversation that ends with a user
        turn is all prompt (with the generation prompt), for predict.

        Truncation: a conversation longer than ``max_length`` keeps its first ``max_length`` tokens (labels
        cut with them) while its prompt fits; when the prompt alone is longer, the feature is the prompt's
        last ``max_length`` tokens and trains nothing.

        Args:
            messages: a checked conversation (:meth:`conversation`).
            max_length: most tokens kept.
            example: the example it came from, for error messages.

        Raises:
            ConfigError: the chat template renders earlier turns differently once later turns follow.
            DataError: the chat template refuses the conversation.
        """
        example = example or {}
        if messages[-1]["role"] != "assistant":  # a prediction input: the whole conversation is the prompt
            prompt = self._token_ids(self._render(messages, True, example))[-max_length:]
            return {"input_ids": prompt, "prompt_length": len(prompt)}
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        text = self._render(messages, False, example)
        spans = []
        for i in turns:
            start = self._render(messages[:i], True, example)
            end = self._render(messages[: i + 1], False, example)
            if not (text.startswith(start) and text.startswith(end) and len(start) <= len(end)):
                raise ConfigError(f"tasks.{self.name}", f"the tokenizer's chat template renders the conversation "
                                                        f"at {_at(example)} differently once later turns follow (it "
                                                        f"rewrites earlier turns), so its assistant turns cannot be "
                                                        f"found; use a model whose template renders every turn "
                                                        f"the same way")
            spans.append((len(start), len(end.rstrip())))
        ids, starts = self._tokens_with_starts(text, [b for span in spans for b in span], example)
        trained = [False] * len(ids)
        for k in range(len(spans)):
            for t in range(starts[2 * k], starts[2 * k + 1]):
                trained[t] = True
        prompt_length = starts[-2]
        if prompt_length >= max_length:  # not even the prompt fits: generate from its end, train nothing
            prompt = ids[prompt_length - max_length: prompt_length]
            return {"input_ids": prompt, "prompt_length": len(prompt)}
        labels = [tok if keep else IGNORE_INDEX for tok, keep in zip(ids, trained)]
        return {"input_ids": ids[:max_length], "prompt_length": prompt_length, "labels": labels[:max_length]}

    def _render(self, messages: list[dict], generation_prompt: bool, example: dict) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=generation_prompt)
        except MultituneError:
            raise
        except Exception as exc:  # jinja's TemplateError, or a template's own raise_exception(...)
            file, line = where(example)
            reason = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise DataError(file, f"the chat template of task {self.name!r} refuses this conversation: {reason}",
                            line) from None

    def _token_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _tokens_with_starts(self, text: str, boundaries: list[int], example: dict) -> tuple[list[int], list[int]]:
        """The token ids of ``text``, and for each character boundary the index of the first token that
        starts at or after it (so tokens ``[starts[a], starts[b])`` begin inside characters ``[a, b)``)."""
        if getattr(self.tokenizer, "is_fast", False):
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            offsets = [start for start, _ in enc["offset_mapping"]]
            return list(enc["input_ids"]), [bisect.bisect_left(offsets, b) for b in boundaries]
        # a slow tokenizer has no offsets: each boundary's text must tokenise to the start of the whole
        ids = self._token_ids(text)
        starts = []
        for b in boundaries:
            head = self._token_ids(text[:b]) if b else []
            if ids[: len(head)] != head:
                raise ConfigError(f"tasks.{self.name}", f"the conversation at {_at(example)} does not tokenise turn "
                                                        f"by turn (a token spans two turns), and the tokenizer is "
                                                        f"not a fast one that gives offsets; load a fast tokenizer")
            starts.append(len(head))
        return ids, starts

    def training_features(self, features: list[dict]) -> list[dict]:
        """The features with at least one trained token (a conversation whose prompt alone is longer than
        ``training.max_length`` has none, and is left out with a warning)."""
        kept = [f for f in features if any(t != IGNORE_INDEX for t in f.get("labels") or ())]
        if not kept:
            raise ConfigError("training.max_length", f"no training conversation of task {self.name!r} keeps an "
                                                     f"assistant token within max_length tokens; raise it")
        if len(kept) < len(features):
            logger.warning("multitune: warning: task %s: %d of %d training conversations are longer than "
                           "training.max_length before their last answer and train nothing; raise "
                           "training.max_length to keep them", self.name, len(features) - len(kept), len(features))
        return kept

    def label_features(self) -> list[dict]:
        """Each label as the answer of a one-turn conversation: its text and the template's end-of-turn token
        are the trained tokens."""
        return [self.encode_conversation([{"role": "user", "content": "?"},
                                          {"role": "assistant", "content": label}], 1 << 20)
                for label in self.labels]

    # -- results ---------------------------------------------------------------------
    def length_strata(self, features: Sequence[dict]) -> list[int] | None:
        """With a label set: each feature's last answer, so that length-grouped batches keep the label mix."""
        if not self.labels:
            return None
        ids: dict[tuple, int] = {}
        return [ids.setdefault(tuple(t for t in (f.get("labels") or ())[f["prompt_length"]:] if t != IGNORE_INDEX),
                               len(ids)) for f in features]

    def compute_metrics(self, predictions, examples) -> dict[str, float]:
        return super().compute_metrics(predictions, [{"target": self.target(ex)} for ex in examples])

    def export_spec(self) -> ExportSpec:
        """The causal LM itself, as for text-to-text; ``task_specific_params`` holds the generation settings
        and the system prompt."""
        spec = super().export_spec()
        params = spec.config["task_specific_params"][self.name]
        params.pop("prefix", None)
        params["system"] = self.config.system
        return spec
