"""Build a tiny random Llama chat model, offline, for the vLLM tests and the benchmark.

Run it with the vLLM interpreter (it needs torch, transformers and tokenizers, which come with vLLM)::

    .venv-vllm/bin/python tests/vllm_tiny_model.py /tmp/tiny-llama

It writes a byte-level BPE tokenizer trained on a few sentences, a chat template, and a 2-layer Llama with
random float32 weights: vLLM loads it like any Hugging Face checkpoint, and nothing is downloaded.
"""

from __future__ import annotations

import sys
from pathlib import Path

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Summarize the following review in one sentence.",
    "Airflow schedules batch jobs; vLLM serves language models on GPUs.",
    "Write a short product description for a red umbrella.",
    "Translate to French: good morning, how are you today?",
    "0123456789 !?.,;:-_()[]{}<>'\"/\\@#$%^&*+=~`|",
]


def build(out_dir: str | Path, *, vocab_size: int = 512, layers: int = 2, hidden: int = 128) -> Path:
    """Write the tiny model to ``out_dir`` and return the folder.

    :param out_dir: the folder to write (created if needed).
    :param vocab_size: BPE vocabulary size.
    :param layers: number of decoder layers.
    :param hidden: hidden size (two attention heads of ``hidden // 2``).
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(out, safe_serialization=True)
    return out


def build_scorer(out_dir: str | Path) -> Path:
    """The same tiny Llama as a cross-encoder (``LlamaForSequenceClassification``, one label): vLLM serves it
    for ``/score`` and ``/rerank`` (``LLM.score``)."""
    import torch
    from transformers import AutoConfig, LlamaForSequenceClassification

    out = build(out_dir)
    config = AutoConfig.from_pretrained(out)
    config.num_labels = 1
    config.architectures = ["LlamaForSequenceClassification"]
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).to(torch.float32).save_pretrained(out, safe_serialization=True)
    return out


if __name__ == "__main__":  # python tests/vllm_tiny_model.py OUT_DIR [--scorer]
    print(build_scorer(sys.argv[1]) if "--scorer" in sys.argv[2:] else build(sys.argv[1]))
