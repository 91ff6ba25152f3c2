"""Tokenizer → GGUF vocabulary metadata, as llama.cpp's converter writes it, so llama.cpp tokenizes exactly like
transformers does.

Byte-level BPE tokenizers (tokenizer.json, model "BPE") become `tokenizer.ggml.model = "gpt2"` with tokens, token
types, merges and the pre-tokenizer name; BPE with byte fallback (Llama-2/Mistral style) becomes model "llama".
The pre-tokenizer name is identified the way llama.cpp does: by hashing the token ids of a fixed probe text.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

from qconv.errors import InputError
from qconv.formats.gguf_writer import GV, KV, array, boolean, string, u32

# llama.cpp's probe text for identifying pre-tokenizers (convert_hf_to_gguf.py, chktxt), as base64 of its UTF-8.
_CHKTXT_B64 = (
    "CiAKCiAKCgogCSAJCSAJCiAgCiAgIAogICAgCiAgICAgCvCfmoAgKG5vcm1hbCkg8J+YtuKAjfCfjKvvuI8gKG11bHRpcGxlIGVt"
    "b2ppcyBjb25jYXRlbmF0ZWQpIOKchSDwn6aZ8J+mmSAzIDMzIDMzMyAzMzMzIDMzMzMzIDMzMzMzMyAzMzMzMzMzIDMzMzMzMzMz"
    "IDMuMyAzLi4zIDMuLi4zIOGegOGetuGek+Gfi+Gej+GfguGeluGet+Gen+GfgeGen+GeouGetuGehfCfmIEgP+aIkeaDs+WcqGFw"
    "cGxl5bel5L2cMTMxNDE1MeWkqe+9niAtLS0tLS09PT09PT09INC90LXRidC+INC90LAg0JHRitC70LPQsNGA0YHQutC4ICcnJycn"
    "J2BgYGBgYGAiIiIiLi4uLi4uISEhISEhPz8/Pz8/IEkndmUgYmVlbiAndG9sZCBoZSdzIHRoZXJlLCAnUkUgeW91IHN1cmU/ICdN"
    "IG5vdCBzdXJlIEknbGwgbWFrZSBpdCwgJ0QgeW91IGxpa2Ugc29tZSB0ZWE/IFdlJ1ZlIGEnbEw="
)
CHKTXT = base64.b64decode(_CHKTXT_B64).decode("utf-8")

# sha256(str(token ids of CHKTXT)) → llama.cpp pre-tokenizer name, for the families qconv converts.
PRE_BY_HASH = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",
}

# token types (llama.h)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _looks_special(text: str) -> bool:
    return (text.startswith("<|") and text.endswith("|>")) or text in ("<pad>", "<mask>") or text.startswith("<unused")


def pre_tokenizer_hash(tok_dir: Path) -> str:
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    return hashlib.sha256(str(tok.encode(CHKTXT)).encode()).hexdigest()


def _token_id(value, vocab: dict, added: dict) -> int | None:
    if isinstance(value, dict):
        value = value.get("content")
    if not isinstance(value, str):
        return None
    return added.get(value, vocab.get(value))


def vocab_kvs(tok_dir: Path, config: dict, pre: str | None = None) -> list[KV]:
    """GGUF tokenizer metadata from a Hugging Face tokenizer folder (tokenizer.json required)."""
    path = tok_dir / "tokenizer.json"
    if not path.is_file():
        raise InputError(
            f"{tok_dir}: GGUF output needs tokenizer.json (sentencepiece-only tokenizers are not supported)"
        )
    try:
        tj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    tc_path = tok_dir / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text(encoding="utf-8")) if tc_path.is_file() else {}
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise InputError(f"{path}: tokenizer model {model.get('type')!r} is not supported for GGUF (BPE is)")
    vocab: dict[str, int] = model["vocab"]
    added = {a["content"]: a["id"] for a in tj.get("added_tokens", [])}
    n = int(config.get("vocab_size") or 0) or 1 + max([*vocab.values(), *added.values()])
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [UNUSED] * n
    for text, i in vocab.items():
        if i < n:
            tokens[i], types[i] = text, NORMAL
    byte_fallback = bool(model.get("byte_fallback"))
    for a in tj.get("added_tokens", []):
        i = a["id"]
        if i >= n:
            continue
        if a.get("special") or _looks_special(a["content"]):
            tokens[i], types[i] = a["content"], CONTROL
        else:
            tokens[i], types[i] = a["content"].replace("\u2581", " "), USER_DEFINED
    kvs: list[KV] = []
    if byte_fallback:
        # Llama-2 style: llama.cpp's SPM vocabulary (scores unused by its BPE-merge-free tokenizer path)
        for i, t in enumerate(tokens):
            if len(t) == 6 and t.startswith("<0x") and t.endswith(">") and types[i] == NORMAL:
                types[i] = BYTE
        kvs += [string("tokenizer.ggml.model", "llama"), string("tokenizer.ggml.pre", "default")]
        kvs.append(array("tokenizer.ggml.tokens", GV.STRING, tokens))
        kvs.append(array("tokenizer.ggml.scores", GV.FLOAT32, [-1000.0] * n))
        kvs.append(array("tokenizer.ggml.token_type", GV.INT32, types))
    else:
        if pre is None:
            h = pre_tokenizer_hash(tok_dir)
            pre = PRE_BY_HASH.get(h)
            if pre is None:
                raise InputError(
                    f"{tok_dir}: llama.cpp pre-tokenizer not recognised (probe hash {h[:16]}…); pass --gguf-pre NAME "
                    "(e.g. llama-bpe, qwen2, smollm, gpt-2) if you know it"
                )
        merges = []
        for m in model.get("merges", []):
            if isinstance(m, str):
                merges.append(m)
            else:  # [left, right] pairs: spaces inside parts are byte-encoded as Ġ, as the converter does
                merges.append(" ".join(part.replace(" ", chr(ord(" ") + 256)) for part in m))
        kvs += [string("tokenizer.ggml.model", "gpt2"), string("tokenizer.ggml.pre", pre)]
        kvs.append(array("tokenizer.ggml.tokens", GV.STRING, tokens))
        kvs.append(array("tokenizer.ggml.token_type", GV.INT32, types))
        kvs.append(array("tokenizer.ggml.merges", GV.STRING, merges))
    for key, name in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"),
                      ("pad", "padding_token_id")):  # fmt: skip
        tid = _token_id(tc.get(f"{key}_token"), vocab, added)
        if tid is None and f"{key}_token_id" in config and isinstance(config[f"{key}_token_id"], int):
            tid = config[f"{key}_token_id"]
        if tid is not None and 0 <= tid < n:
            kvs.append(u32(f"tokenizer.ggml.{name}", tid))
    add_bos, add_eos = _adds_special(tj, tc, n)
    if add_bos is not None:
        kvs.append(boolean("tokenizer.ggml.add_bos_token", add_bos))
    if add_eos is not None:
        kvs.append(boolean("tokenizer.ggml.add_eos_token", add_eos))
    template = tc.get("chat_template")
    if not isinstance(template, str) and (tok_dir / "chat_template.jinja").is_file():
        template = (tok_dir / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(template, str):
        kvs.append(string("tokenizer.chat_template", template))
    return kvs


def _adds_special(tj: dict, tc: dict, n_vocab: int) -> tuple[bool | None, bool | None]:
    """add_bos / add_eos as the converter infers them: the post-processor first, then tokenizer_config."""
    bos = eos = None
    post = tj.get("post_processor") or {}
    kinds = [post] + list(post.get("processors", [])) if post.get("type") == "Sequence" else [post]
    for p in kinds:
        if p.get("type") == "TemplateProcessing":
            single = p.get("single", [])
            bos = bool(single) and "SpecialToken" in single[0]
            eos = bool(single) and "SpecialToken" in single[-1]
        elif p.get("type") == "ByteLevel" and bos is None:
            bos = eos = False
        elif p.get("type") == "RobertaProcessing":
            bos = eos = True
    if bos is None and isinstance(tc.get("add_bos_token"), bool):
        bos = tc["add_bos_token"]
    if eos is None and isinstance(tc.get("add_eos_token"), bool):
        eos = tc["add_eos_token"]
    if n_vocab == 49152:  # the converter's special case for SmolLM's vocabulary
        bos = False
    return bos, eos
