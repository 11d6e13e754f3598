"""DVReward server: the Decompositional Verifiable Reward of AlphaGRPO (paper Sec. 4.2) over HTTP.

Offline, an LLM decomposes each prompt into atomic yes/no questions: semantic ones over 10 dimensions, then
quality ones over 8 aspects (`decompose`); `synthesize` first writes the prompts, from sampled primitives
(Sec. 4.3, Primitive-to-Prompt). Online, an MLLM verifier answers each question about an image; the
confidence of one question is s = P(yes) / (P(yes) + P(no)) from the first answer token, and the reward of an
image is the geometric mean R = sqrt(mean(s_semantic) * mean(s_quality)).

    python reward_server.py --verifier Qwen/Qwen3-VL-8B-Instruct --port 8000   # transformers verifier (a GPU)
    python reward_server.py --verifier toy --port 8000                         # the rule-based toy judge
    python reward_server.py --verifier openai:http://127.0.0.1:30000/v1 --model Qwen/Qwen3-VL-30B-A3B-Instruct
    python reward_server.py score --image x.png --question "Is there a red apple?" --verifier toy
    python reward_server.py pilot --image right.png --image wrong.png --prompt "..." --question "..." \
        --verifier Qwen/Qwen3-VL-8B-Instruct                                   # holistic 0-10 vs P(yes) (Sec. 2)
    python reward_server.py bench                                              # CPU: naive, shared, floor
    python reward_server.py bench --shape qwen3-vl-8b --images 8               # on a GPU: Qwen3-VL-8B's shape
    python reward_server.py decompose prompts.txt --llm http://127.0.0.1:30000/v1 --model Qwen/Qwen3-32B \
        --out prompts.jsonl                                                    # or --llm <path | hub id>
    python reward_server.py synthesize --llm http://127.0.0.1:30000/v1 --model Qwen/Qwen3-235B-A22B \
        --per-task 500 --test-per-task 26 --out my_prompts.jsonl               # a set like the paper's (4.3)

API (JSON; images are base64 PNG, never pickle; 127.0.0.1 by default; with --token or $ALPHAGRPO_REWARD_TOKEN
every request but GET /health needs "Authorization: Bearer TOKEN"):
    GET  /health  -> {"status": "ok", "verifier": ..., counters}
    POST /score   {"images": [b64], "semantic_questions": [[str]], "quality_questions": [[str]]}
               -> {"rewards": [float], "semantic_scores": [[float]], "quality_scores": [[float]]}
One question list per image; an empty list scores 1.0. A malformed request gets a 4xx {"error": ...} naming
the problem (413 beyond a size limit); a failing verifier endpoint gets 502/503, never a made-up score.

Speed: one worker thread owns the verifier and batches concurrent requests (Batcher); the transformers
verifier reads each image's system prompt + image once and its questions in the same forward pass (one
sequence per image, a block-causal mask), close to the floor of one pass over all those tokens (`bench`
prints both). The listening socket queues up to 1024 connections, for many trainer processes that each open
their own. Left out: reusing an image's prefix across requests (SGLang's radix cache does that).
"""
from __future__ import annotations

import argparse
import base64
import binascii
import collections
import hmac
import io
import json
import math
import os
import queue
import random
import re
import statistics
import struct
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests
from PIL import Image, ImageStat

# torch, transformers and tokenizers are imported inside the functions that use them: they are heavy, and the
# toy verifier, the OpenAI verifier, the server and `decompose` with an LLM endpoint run without them.

# --------------------------------------------------------------------------------------------------
# The API and the DVReward arithmetic (Sec. 4.2): instructions, limits, confidence, reward, request parsing
# --------------------------------------------------------------------------------------------------

STRICT_AUDITOR = ("You are a strict visual auditor. You check generated images against a checklist. Look at "
                  "the image carefully and answer the question with one word, Yes or No. Answer Yes only if "
                  "the image clearly shows it.")
# The pilot study's holistic score (Sec. 2, Fig. 3): a VIEScore-style 0-10 rating of the whole image, which
# the paper found blind to the difference a single yes/no question sees (`pilot`)
HOLISTIC_INSTRUCTION = ("You are a professional digital artist. Rate how well this AI-generated image follows "
                        "the request: \"{prompt}\". 0 means that it does not follow the request at all, 10 "
                        "that it follows it perfectly. Answer with the number only.")
YES_VARIANTS = ("Yes", "yes", "YES", " Yes", " yes", " YES")
NO_VARIANTS = ("No", "no", "NO", " No", " no", " NO")

# the official data's tags (Sec. 4.2): 10 semantic dimensions, then 8 quality aspects
SEMANTIC_TAGS = ("Style", "Environment", "Viewpoint", "Existence", "Count", "Attribute", "Action", "Spatial",
                 "Text", "Negative")
QUALITY_TAGS = ("Geometry", "Anatomy", "Texture", "Coherence", "Lighting", "Physics", "Legibility",
                "Aesthetics")


@dataclass(frozen=True)
class Limits:
    """What one /score request may hold (HTTP 413 beyond it); each is a flag of the server."""
    max_images: int = field(default=256, metadata={"help": "images per request"})
    max_side: int = field(default=4096, metadata={"help": "pixels per image side (read before decoding)"})
    max_request_pixels: int = field(default=1 << 27, metadata={"help": "pixels of all images of a request"})
    max_questions: int = field(default=64, metadata={"help": "questions per image, semantic and quality"})
    max_question_chars: int = field(default=500, metadata={"help": "characters per question"})


class ApiError(Exception):
    """An error a client gets as HTTP `status` with {"error": message}; the message names the problem."""
    status = 500

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status or self.status


class BadRequest(ApiError, ValueError):
    """A request the server cannot score: 400, or 413 past a limit."""
    status = 400


class UpstreamError(ApiError, RuntimeError):
    """The verifier endpoint failed: 502, it answered wrongly; 503, unreachable after the retries."""
    status = 503


def confidence(yes_logits, no_logits) -> float:
    """s = P(yes) / (P(yes) + P(no)) (Sec. 4.2, confidence scoring), where P(yes) sums the probabilities of
    all "yes" token variants; the softmax's normalizer cancels, so logits suffice."""
    def logsumexp(xs):
        top = max(xs)
        return top + math.log(sum(math.exp(x - top) for x in xs))

    return 1.0 / (1.0 + math.exp(logsumexp(no_logits) - logsumexp(yes_logits)))


def confidence_from_top_logprobs(top: list, generated: str) -> tuple[float, bool]:
    """s from an OpenAI-style top_logprobs list [{"token", "logprob"}]: P(yes) and P(no) sum the variants
    (case- and space-insensitive). Returns (s, found); when neither is among them, s comes from the generated
    token (1 yes, 0 no, 0.5 otherwise) and found is False, so the caller can count it."""
    prob = {"yes": 0.0, "no": 0.0}
    for entry in top:
        word = str(entry.get("token", "")).strip().lower()
        if word in prob:
            prob[word] += math.exp(float(entry["logprob"]))
    if prob["yes"] + prob["no"] > 0:
        return prob["yes"] / (prob["yes"] + prob["no"]), True
    from_generated = {"yes": 1.0, "no": 0.0}.get(generated.strip().lower(), 0.5)
    return from_generated, False


def dvreward(semantic: list, quality: list) -> float:
    """R = sqrt(mean(s_semantic) * mean(s_quality)) (Sec. 4.2); an empty list counts as 1.0."""
    mean = lambda xs: sum(xs) / len(xs) if xs else 1.0  # noqa: E731
    return math.sqrt(mean(semantic) * mean(quality))


def holistic_score(answer: str) -> float | None:
    """The pilot's holistic score: the first whole number 0-10 in the verifier's generated answer, / 10; None
    when it wrote none (never a made-up score)."""
    match = re.search(r"(?<![\d.])(10|\d)(?![\d])(?:\.0+)?(?!\.\d)", answer)
    return int(match[1]) / 10 if match else None


def png_size(data: bytes, where: str) -> tuple[int, int]:
    """(width, height) from the PNG signature and IHDR chunk, read before any decoding: a small file can
    declare a huge image (a decompression bomb), so the size is checked first."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise BadRequest(f"{where} is not a PNG image")
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise BadRequest(f"{where} is a broken PNG (no IHDR header)")
    return struct.unpack(">II", data[16:24])


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)  # fast: lossless either way
    return buf.getvalue()


def data_url(image: Image.Image) -> str:
    """An image as the OpenAI API's inline PNG URL."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def decode_png(data: bytes, where: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data), formats=["PNG"])
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadRequest(f"{where} is a broken PNG ({e})") from None
    return image.convert("RGB")


def parse_score_request(body, limits: Limits = Limits()) -> tuple[list, list, list]:
    """Validate a /score body; raises BadRequest naming the field. Every check that needs no decoding runs
    before any image is decoded."""
    keys = ("images", "semantic_questions", "quality_questions")
    if not isinstance(body, dict):
        raise BadRequest(f"the body must be a JSON object with {', '.join(keys)}, got {type(body).__name__}")
    unknown = sorted(set(body) - set(keys))
    if unknown:
        raise BadRequest(f"unknown key(s) {', '.join(map(repr, unknown))}; expected {', '.join(keys)}")
    for key in keys:
        if not isinstance(body.get(key), list):
            raise BadRequest(f"'{key}' is missing or not a list")
    n_images = len(body["images"])
    if n_images > limits.max_images:
        raise BadRequest(f"'images' has {n_images} images; the limit is {limits.max_images} per request", 413)
    for key in keys[1:]:
        if len(body[key]) != n_images:
            raise BadRequest(f"'{key}' has {len(body[key])} lists for {n_images} images (one list per image)")
        for i, qs in enumerate(body[key]):
            if not isinstance(qs, list) or not all(isinstance(q, str) and q.strip() for q in qs):
                raise BadRequest(f"'{key}'[{i}] must be a list of non-empty strings")
            for j, q in enumerate(qs):
                if len(q) > limits.max_question_chars:
                    raise BadRequest(f"'{key}'[{i}][{j}] has {len(q)} characters; the limit is "
                                     f"{limits.max_question_chars}", 413)
    for i in range(n_images):
        count = len(body["semantic_questions"][i]) + len(body["quality_questions"][i])
        if count > limits.max_questions:
            raise BadRequest(f"image {i} has {count} questions; the limit is {limits.max_questions} "
                             "per image", 413)
    blobs = []
    pixels = 0
    for i, b64 in enumerate(body["images"]):
        if not isinstance(b64, str):
            raise BadRequest(f"images[{i}] must be a base64 string, got {type(b64).__name__}")
        try:
            data = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest(f"images[{i}] is not valid base64") from None
        w, h = png_size(data, f"images[{i}]")
        if not (0 < w <= limits.max_side and 0 < h <= limits.max_side):
            raise BadRequest(f"images[{i}] is {w}x{h} pixels; each side must be 1 to {limits.max_side}", 413)
        pixels += w * h
        if pixels > limits.max_request_pixels:
            raise BadRequest(f"the images up to images[{i}] hold {pixels} pixels; the limit is "
                             f"{limits.max_request_pixels} per request", 413)
        blobs.append(data)
    images = [decode_png(data, f"images[{i}]") for i, data in enumerate(blobs)]
    return images, body["semantic_questions"], body["quality_questions"]


def score_items(verifier, items: list) -> list:
    """items: [(image, questions)] -> one score list per item. A verifier may batch them (score_many);
    otherwise each image is scored on its own."""
    if hasattr(verifier, "score_many"):
        return verifier.score_many(items)
    return [verifier.score(image, questions) for image, questions in items]


def score_batch(verifier, images, semantic, quality) -> dict:
    items = [(image, list(sem) + list(qual)) for image, sem, qual in zip(images, semantic, quality)]
    out = {"rewards": [], "semantic_scores": [], "quality_scores": []}
    for scores, sem in zip(score_items(verifier, items), semantic):
        semantic_scores = scores[:len(sem)]
        quality_scores = scores[len(sem):]
        out["semantic_scores"].append(semantic_scores)
        out["quality_scores"].append(quality_scores)
        out["rewards"].append(dvreward(semantic_scores, quality_scores))
    return out


# --------------------------------------------------------------------------------------------------
# Verifiers: score(image, questions) -> [s]; score_many([(image, questions)]) batches where it helps
# --------------------------------------------------------------------------------------------------


def pick_device(device: str = "auto", dtype: str = "auto"):
    """-> (device, torch dtype); auto: cuda if there is one, bf16 on cuda and fp32 elsewhere."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    return device, getattr(torch, dtype)


class ToyVerifier:
    """A rule-based judge for the toy preset. It answers a closed grammar of questions about colours,
    `Is the image [mostly] <colour>?` and `Is the (top|bottom|left|right) half of the image <colour>?`,
    with Yes/No logits proportional to a colour margin, so rewards are graded and the DVReward arithmetic
    is the same as with an MLLM. Grey is a colour of its own: without it a grey region sat halfway to every
    colour and earned ~0.5 on every question, and the toy's text policy learnt to hedge into grey images
    (README, "The toy world"). Any other question is a 400, never a guess."""

    name = "toy"
    COLOURS = {"red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1), "yellow": (1, 1, 0),
               "cyan": (0, 1, 1), "magenta": (1, 0, 1), "white": (1, 1, 1), "black": (0, 0, 0),
               "grey": (0.5, 0.5, 0.5)}
    PATTERN = re.compile(r"is the (?:image(?: mostly)?|(?P<region>top|bottom|left|right) half of the image) "
                         r"(?P<colour>\w+)\s*\?", re.IGNORECASE)
    GAIN = 8.0  # logit per unit of colour margin

    def answer_logits(self, image: Image.Image, question: str) -> tuple[float, float]:
        match = self.PATTERN.fullmatch(question.strip())
        if not match or match["colour"].lower() not in self.COLOURS:
            raise BadRequest(f"the toy verifier cannot answer {question!r}: it knows only 'Is the image "
                             "[mostly] <colour>?' and 'Is the top|bottom|left|right half of the image "
                             f"<colour>?' with a colour in {', '.join(self.COLOURS)}")
        width, height = image.size
        boxes = {"": (0, 0, width, height), "top": (0, 0, width, height // 2),
                 "bottom": (0, height // 2, width, height), "left": (0, 0, width // 2, height),
                 "right": (width // 2, 0, width, height)}
        region = image.convert("RGB").crop(boxes[(match["region"] or "").lower()])
        rgb = [c / 255 for c in ImageStat.Stat(region).mean]
        distance = {name: math.dist(rgb, ref) for name, ref in self.COLOURS.items()}
        target = match["colour"].lower()
        # margin > 0 iff the region's mean colour is closer to the target than to any other colour
        margin = min(d for name, d in distance.items() if name != target) - distance[target]
        return self.GAIN * margin, 0.0

    def score(self, image: Image.Image, questions: list[str]) -> list[float]:
        return [confidence([yes], [no]) for yes, no in (self.answer_logits(image, q) for q in questions)]


class TransformersVerifier:
    """A Qwen-VL instruct model from transformers; s from the first answer token's yes/no probabilities.

    Shared image prefix (the default): the chat text is [system prompt, image] + [question, assistant turn],
    and the first part is the same for every question about one image. So each image becomes one sequence,
    its prefix followed by every question's suffix, under a block-causal mask: a suffix token sees the prefix
    and the earlier tokens of its own suffix, nothing of the other questions. Every token is read once, in one
    forward pass per batch of images with the same token count (right-padded), and each answer is read at its
    suffix's last token. Qwen-VL's rotary positions are 3-D (time, height, width) and the image advances them
    by max(h, w) tokens, not by its token count, so the prefix positions come from the model's get_rope_index
    and every suffix starts at their maximum + 1, as if it followed the prefix alone; they are passed
    explicitly, so the model's stored `rope_deltas` is neither read nor written. This relies on Qwen-VL
    internals (`model.model.get_rope_index`, `model.lm_head`, a 4-D attention mask passed through as it is),
    hence requirements.txt pins transformers>=5.24,<5.25.
    `score_naive` is the plain path: each question as one full sequence, all in one left-padded batch."""

    def __init__(self, path: str, device: str = "auto", dtype: str = "auto", shared_prefix: bool = True,
                 prefill_batch: int = 8, model=None):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.torch = torch
        device, torch_dtype = pick_device(device, dtype)
        self.device = torch.device(device)
        self.name = path
        self.processor = AutoProcessor.from_pretrained(path)
        if model is None:  # else an already built model (the benchmark's random ones)
            model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch_dtype)
        self.model = model.to(self.device).eval()
        self.prefill_batch = prefill_batch  # images per forward pass of the shared path
        tokenizer = self.processor.tokenizer

        # every single-token spelling of yes / no, found with the tokenizer at start-up (an unknown-token
        # id would count any unknown word as a yes, so each id must decode back to the word)
        def single_token_ids(words):
            found = set()
            for word in words:
                ids = tokenizer.encode(word, add_special_tokens=False)
                decodes_back = len(ids) == 1 and tokenizer.decode(ids).strip().lower() == word.strip().lower()
                if decodes_back and ids[0] != tokenizer.unk_token_id:
                    found.add(ids[0])
            return sorted(found)

        self.yes_ids = single_token_ids(YES_VARIANTS)
        self.no_ids = single_token_ids(NO_VARIANTS)
        if not self.yes_ids or not self.no_ids:
            raise ValueError(f"{path}: the tokenizer has no single-token 'yes'/'no'; it cannot be a verifier")
        probe = self.chat_text("Is it?")
        if "<think>" in probe[-40:]:
            raise ValueError(f"{path}: its chat template opens a <think> block; use an Instruct "
                             "(non-thinking) model, since the first answer token must be the yes/no")
        # the prefix is the chat text up to the image's closing token; the question must come after it
        end_id = getattr(self.model.config, "vision_end_token_id", None)
        vision_end = tokenizer.convert_ids_to_tokens(end_id) if end_id is not None else None
        self.prefix_text = ""
        if vision_end and vision_end in probe:
            self.prefix_text = probe[:probe.rfind(vision_end) + len(vision_end)]
        self.shared_prefix = shared_prefix
        qwen_vl = hasattr(getattr(self.model, "model", None), "get_rope_index")
        if shared_prefix and not (self.prefix_text and qwen_vl):
            print(f"{path}: not a Qwen-VL model with the image before the question; scoring with the naive "
                  "path (one full sequence per question)", file=sys.stderr)
            self.shared_prefix = False

    def answer(self, image: Image.Image, instruction: str, max_new_tokens: int = 8) -> str:
        """The verifier's greedy answer to a free instruction about the image (the pilot's holistic score)."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = self.processor(text=[text], images=[image], return_tensors="pt").to(self.device)
        with self.torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1]:]
        return self.processor.tokenizer.decode(new, skip_special_tokens=True)

    def chat_text(self, question: str) -> str:
        messages = [{"role": "system", "content": STRICT_AUDITOR},
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def suffix_ids(self, question: str) -> list[int]:
        """The tokens after the shared prefix: the question and the assistant turn."""
        text = self.chat_text(question)
        if not text.startswith(self.prefix_text):  # a question that changes the prefix (never expected)
            raise ValueError(f"the chat text of {question!r} does not start with the shared prefix")
        return self.processor.tokenizer(text[len(self.prefix_text):], add_special_tokens=False)["input_ids"]

    def score(self, image: Image.Image, questions: list[str]) -> list[float]:
        return self.score_many([(image, questions)])[0]

    def score_many(self, items: list) -> list:
        """items: [(image, questions)] -> one score list per item."""
        if self.shared_prefix:
            logits = self.logits_shared(items)
        else:
            logits = [self.logits_naive(image, qs) for image, qs in items]
        return [self.confidences(x) for x in logits]

    def score_naive(self, image: Image.Image, questions: list[str]) -> list[float]:
        return self.confidences(self.logits_naive(image, questions))

    def confidences(self, logits) -> list[float]:
        return [confidence(row[self.yes_ids].tolist(), row[self.no_ids].tolist()) for row in logits]

    def logits_naive(self, image: Image.Image, questions: list[str]):
        """(n, V) first-answer-token logits, one full sequence per question (the image encoded n times)."""
        torch = self.torch
        if not questions:
            return torch.zeros(0, 1)
        texts = [self.chat_text(q) for q in questions]
        inputs = self.processor(text=texts, images=[image] * len(texts), padding=True, padding_side="left",
                                return_tensors="pt").to(self.device)
        with torch.inference_mode():
            return self.model(**inputs, logits_to_keep=1).logits[:, -1].float()  # (n, V)

    def logits_shared(self, items: list) -> list:
        """[(n_i, V)] first-answer-token logits per item; an image and its questions are read in one pass."""
        out = [self.torch.zeros(0, 1) for _ in items]
        groups = {}  # images with the same token count share a pass: {grid: [(item index, prefix inputs)]}
        for i, (image, questions) in enumerate(items):
            if questions:
                enc = self.processor(text=[self.prefix_text], images=[image], return_tensors="pt")
                groups.setdefault(tuple(enc["image_grid_thw"].flatten().tolist()), []).append((i, enc))
        for group in groups.values():
            for start in range(0, len(group), self.prefill_batch):
                chunk = group[start:start + self.prefill_batch]
                logits = self.packed_logits([enc for _, enc in chunk], [items[i][1] for i, _ in chunk])
                for (i, _), x in zip(chunk, logits.split([len(items[i][1]) for i, _ in chunk])):
                    out[i] = x
        return out

    def packed_logits(self, encs: list, questions: list):
        """n images of one token count (their prefix inputs) and their questions -> (all questions, V) logits.
        Row b of the batch is [prefix of image b (P)][suffix 1][suffix 2]...[padding], P + S tokens."""
        torch = self.torch
        dev = self.device
        suffixes = [[self.suffix_ids(q) for q in qs] for qs in questions]

        def stacked(key):  # one prefix input of all n images, as one batch on the device
            return torch.cat([enc[key] for enc in encs]).to(dev)

        prefix = stacked("input_ids")  # (n, P)
        grid = stacked("image_grid_thw")
        n, P = prefix.shape
        S = max(sum(map(len, rows)) for rows in suffixes)
        ids = torch.full((n, S), self.processor.tokenizer.pad_token_id or 0)
        segment = torch.full((n, P + S), -1)  # 0: the prefix, j: the j-th suffix, -1: padding
        segment[:, :P] = 0
        step = torch.zeros(n, S, dtype=torch.long)  # a suffix token's index within its suffix
        last = []  # where each suffix ends, as an index into the flattened (n * (P + S)) tokens
        for b, rows in enumerate(suffixes):
            offset = 0  # where suffix j starts after the prefix
            for j, suffix in enumerate(rows, 1):
                ids[b, offset:offset + len(suffix)] = torch.tensor(suffix)
                segment[b, P + offset:P + offset + len(suffix)] = j
                step[b, offset:offset + len(suffix)] = torch.arange(len(suffix))
                offset += len(suffix)
                last.append(b * (P + S) + P + offset - 1)
        segment = segment.to(dev)
        pos, _ = self.model.model.get_rope_index(prefix, mm_token_type_ids=stacked("mm_token_type_ids"),
                                                 image_grid_thw=grid)  # (3, n, P)
        suffix_pos = pos.amax(dim=(0, 2))[:, None] + 1 + step.to(dev)  # (n, S); text: t = h = w
        pos = torch.cat([pos, suffix_pos.expand(3, n, S)], dim=2)  # (3, n, P+S)
        # block-causal: a token sees the earlier tokens of its own segment and the whole prefix (padding
        # sees the prefix too, so that no row of the softmax is empty)
        causal = torch.ones(P + S, P + S, dtype=torch.bool, device=dev).tril()
        same = segment[:, :, None] == segment[:, None, :]  # (n, P+S queries, P+S keys)
        sees = causal & (same | (segment[:, None, :] == 0))
        dtype = self.model.dtype
        mask = torch.zeros(sees.shape, dtype=dtype, device=dev).masked_fill(~sees, torch.finfo(dtype).min)
        with torch.inference_mode():
            hidden = self.model.model(input_ids=torch.cat([prefix, ids.to(dev)], dim=1), position_ids=pos,
                                      pixel_values=stacked("pixel_values"), image_grid_thw=grid,
                                      attention_mask=mask[:, None], use_cache=False).last_hidden_state
            at_ends = hidden.flatten(0, 1)[torch.tensor(last, device=dev)]  # (n, P+S, C) -> (questions, C)
            return self.model.lm_head(at_ends).float()  # (questions, V)


class OpenAIVerifier:
    """An MLLM served behind an OpenAI-compatible endpoint (SGLang or vLLM, as the paper serves its verifier):
    one /chat/completions request per question with max_tokens 1 and the top 20 log-probs of the first token.
    Questions are sent concurrently; failures are retried with backoff, then raised (HTTP 502/503), never
    turned into a score."""

    def __init__(self, base_url: str, model: str, api_key: str = "", workers: int = 8, tries: int = 5,
                 backoff_s: float = 0.5, timeout_s: float = 120.0):
        if not model:
            raise ValueError("an openai: verifier needs --model (the name the endpoint serves)")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.name = f"openai:{base_url} ({model})"
        self.model = model
        self.tries = tries
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.pool = ThreadPoolExecutor(max_workers=workers)
        self.sessions = threading.local()  # requests.Session is not thread-safe: one per pool thread
        self.lock = threading.Lock()
        self.counters = {"endpoint_requests": 0, "endpoint_retries": 0, "no_yes_no_in_top_logprobs": 0}

    def count(self, key: str):
        with self.lock:
            self.counters[key] += 1

    def score(self, image: Image.Image, questions: list[str]) -> list[float]:
        return self.score_many([(image, questions)])[0]

    def score_many(self, items: list) -> list:
        # each image encoded once, whatever its number of questions
        urls = [data_url(image) for image, _ in items]
        jobs = [(url, q) for url, (_, qs) in zip(urls, items) for q in qs]
        scores = iter(list(self.pool.map(lambda job: self.ask(*job), jobs)))
        return [[next(scores) for _ in qs] for _, qs in items]

    def ask(self, image_url: str, question: str) -> float:
        content = [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": question}]
        messages = [{"role": "system", "content": STRICT_AUDITOR}, {"role": "user", "content": content}]
        body = {"model": self.model, "max_tokens": 1, "temperature": 0, "logprobs": True, "top_logprobs": 20,
                "messages": messages}
        answer = self.post(body)
        try:
            first = answer["choices"][0]["logprobs"]["content"][0]
            s, found = confidence_from_top_logprobs(first["top_logprobs"], first.get("token", ""))
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise UpstreamError(f"{self.url} answered without choices[0].logprobs.content[0].top_logprobs "
                                f"({type(e).__name__}: {e}): does the server support logprobs? vLLM and "
                                "SGLang return them; some servers (transformers serve) ignore the request "
                                "for them", 502) from None
        if not found:  # counted in /health: many of these mean the prompt or the model is off
            self.count("no_yes_no_in_top_logprobs")
        return s

    def answer(self, image: Image.Image, instruction: str, max_new_tokens: int = 8) -> str:
        """The endpoint's greedy answer to a free instruction about the image (the pilot's holistic score)."""
        content = [{"type": "image_url", "image_url": {"url": data_url(image)}},
                   {"type": "text", "text": instruction}]
        body = {"model": self.model, "max_tokens": max_new_tokens, "temperature": 0,
                "messages": [{"role": "user", "content": content}]}
        try:
            return str(self.post(body)["choices"][0]["message"]["content"])
        except (KeyError, IndexError, TypeError) as e:
            raise UpstreamError(f"{self.url} answered without choices[0].message.content ({e})",
                                502) from None

    def post(self, body: dict) -> dict:
        """POST body to the endpoint -> its JSON answer, retrying failures with exponential backoff."""
        if not hasattr(self.sessions, "session"):
            self.sessions.session = requests.Session()
        session = self.sessions.session
        problem = ""
        for attempt in range(self.tries):
            if attempt:
                self.count("endpoint_retries")
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            self.count("endpoint_requests")
            try:
                r = session.post(self.url, json=body, headers=self.headers, timeout=self.timeout_s)
            except requests.RequestException as e:
                problem = f"cannot reach it ({type(e).__name__})"
                continue
            if r.status_code == 200:
                break
            problem = f"HTTP {r.status_code}: {r.text[:300]}"
            if r.status_code < 500 and r.status_code != 429:  # our request is wrong: retrying will not help
                raise UpstreamError(f"{self.url} rejected the request ({problem})", 502)
        else:
            message = f"verifier endpoint {self.url} failed {self.tries} tries; the last: {problem}"
            raise UpstreamError(message, 503)
        try:
            return r.json()
        except ValueError:
            raise UpstreamError(f"{self.url} answered 200 with a body that is not JSON", 502) from None


# --------------------------------------------------------------------------------------------------
# Random and toy Qwen3-VL models: used by `bench`, `--verifier random:NAME` and alphagrpo.py's toy reasoner
# --------------------------------------------------------------------------------------------------

TOY_WORDS = ("red green blue yellow cyan magenta white black top bottom left right half image mostly bright "
             "dark the a of is and with in on sky sun sea grass fire light shadow Yes No yes no Is The A "
             "Answer Diagnosis Fix above below lower overhead at make paint fills burns covers hang clear "
             "calm fresh thick ripe lawn snow clouds tomato leaf somewhere thing shape pattern picture wall "
             "cloth : . , ? ! system user assistant").split()
TOY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def toy_tokenizer(words=TOY_WORDS):
    """A word-level tokenizer over `words` with Qwen's special tokens and a Qwen-style chat template, built
    offline with `tokenizers` (no download). The toy reasoner, the toy verifiers and the toy FLUX.2 klein's
    text encoder share it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>", "[UNK]"]
    tk = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + list(words))}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="[UNK]", additional_special_tokens=specials[1:7],
                                   chat_template=TOY_CHAT_TEMPLATE)


def vlm_config(text: dict, vision: dict, image_px: int, words=TOY_WORDS):
    """A Qwen3-VL config with the given text_config / vision_config fields, and its processor with a
    word-level tokenizer over `words` built offline with `tokenizers` (no download). Every image is resized
    to image_px^2, i.e. (image_px / 32)^2 image tokens. Returns (processor, config)."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    tok = toy_tokenizer(words)
    vocab = tok.get_vocab()
    size = {"shortest_edge": image_px**2, "longest_edge": image_px**2}
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size, patch_size=16, temporal_patch_size=2, merge_size=2),
        video_processor=Qwen3VLVideoProcessor(size=size, patch_size=16, temporal_patch_size=2, merge_size=2),
        tokenizer=tok, chat_template=TOY_CHAT_TEMPLATE)
    hd = text.get("head_dim", 8)
    text = {"vocab_size": len(vocab), "rope_parameters": {  # T/H/W split of the rotary dimensions (M-RoPE)
        "rope_type": "default", "rope_theta": 5e6, "mrope_interleaved": True,
        "mrope_section": [hd // 4, hd // 8, hd // 8]}, **text}
    positions = max(vision["num_position_embeddings"], (image_px // 16) ** 2)  # of the vision tower's patches
    config = Qwen3VLConfig(
        text_config=text, vision_config={"patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
                                         **vision, "num_position_embeddings": positions},
        image_token_id=vocab["<|image_pad|>"], video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"], vision_end_token_id=vocab["<|vision_end|>"],
        eos_token_id=vocab["<|im_end|>"], pad_token_id=vocab["<|endoftext|>"],
        tie_word_embeddings=text.get("tie_word_embeddings", False))
    return processor, config


def make_vlm(text: dict, vision: dict, image_px: int, seed: int = 0, words=TOY_WORDS):
    """A random Qwen3-VL (the reasoner's and the verifier's class) of the given sizes, and its processor
    (vlm_config). Returns (processor, model)."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    processor, config = vlm_config(text, vision, image_px, words)
    torch.manual_seed(seed)
    return processor, Qwen3VLForConditionalGeneration(config)


# The sizes of the text model and the vision tower; vocab 0 keeps the toy's.
BENCH_SHAPES = {
    "small": dict(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=512, vocab=0, vision_hidden=32,
                  vision_depth=2, vision_heads=4, vision_intermediate=64),
    "qwen3-vl-8b": dict(hidden=4096, layers=36, heads=32, kv_heads=8, intermediate=12288, vocab=151936,
                        vision_hidden=1152, vision_depth=27, vision_heads=16, vision_intermediate=4304),
}


def random_verifier(shape: dict, image_px: int = 512, device: str = "auto", dtype: str = "auto",
                    seed: int = 0, shared_prefix: bool = True) -> TransformersVerifier:
    """A TransformersVerifier over a random Qwen3-VL of `shape`: the toy's processor and word-level tokenizer
    (images resized to image_px^2, i.e. (image_px/32)^2 image tokens), the model built in memory on the device
    (saving a multi-billion-parameter random model to disk would take longer than the benchmark)."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration
    from transformers.utils import logging as transformers_logging

    hd = shape["hidden"] // shape["heads"]
    mrope = [hd // 2 - 2 * (hd * 5 // 32), hd * 5 // 32, hd * 5 // 32]  # T/H/W, as Qwen3-VL splits its 64
    text = dict(hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                num_key_value_heads=shape["kv_heads"], head_dim=hd, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_interleaved": True,
                                 "mrope_section": mrope})
    if shape["vocab"]:
        text["vocab_size"] = shape["vocab"]
    vision = dict(depth=shape["vision_depth"], hidden_size=shape["vision_hidden"],
                  num_heads=shape["vision_heads"], intermediate_size=shape["vision_intermediate"],
                  out_hidden_size=shape["hidden"], num_position_embeddings=64, deepstack_visual_indexes=[0])
    processor, config = vlm_config(text, vision, image_px)
    device, torch_dtype = pick_device(device, dtype)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen3VLForConditionalGeneration._from_config(config, dtype=torch_dtype)
    transformers_logging.disable_progress_bar()  # the processor's save/load bars would bury the figures
    with tempfile.TemporaryDirectory() as tmp:
        processor.save_pretrained(tmp)  # read back with from_pretrained, as a real verifier's is
        verifier = TransformersVerifier(tmp, device, dtype, shared_prefix=shared_prefix, model=model)
    verifier.name = "random Qwen3-VL (" + ", ".join(f"{k} {x}" for k, x in shape.items()) + ")"
    return verifier


# --------------------------------------------------------------------------------------------------
# Server: a worker thread batches concurrent requests; the HTTP handler validates and waits
# --------------------------------------------------------------------------------------------------


class Batcher:
    """One worker thread owns the verifier, so concurrent requests never race on the model's state. It takes
    a request, waits up to wait_s for more, up to max_images images, and scores them as one batch (only for a
    verifier that batches, score_many: for the others a merged batch would only delay the first request).
    It acts as a verifier itself (score_many), so score_batch works on it."""

    def __init__(self, verifier, max_images: int = 32, wait_s: float = 0.005):
        self.verifier = verifier
        self.name = verifier.name
        self.wait_s = wait_s
        self.max_images = max_images if hasattr(verifier, "score_many") else 1
        self.jobs = queue.Queue()
        self.counters = {"requests": 0, "batches": 0, "images": 0}
        threading.Thread(target=self.run, name="verifier-worker", daemon=True).start()

    def score_many(self, items: list) -> list:
        done = Future()
        self.jobs.put((items, done))
        return done.result()

    def run(self):
        while True:
            batch = [self.jobs.get()]  # [(items, future)]
            n_images = len(batch[0][0])
            deadline = time.monotonic() + self.wait_s
            while n_images < self.max_images and (time_left := deadline - time.monotonic()) > 0:
                try:
                    batch.append(self.jobs.get(timeout=time_left))
                except queue.Empty:
                    break
                n_images += len(batch[-1][0])
            self.counters["batches"] += 1
            self.counters["requests"] += len(batch)
            self.counters["images"] += n_images
            self.score(batch)

    def score(self, batch: list):
        try:
            scores = score_items(self.verifier, [item for items, _ in batch for item in items])
        except BadRequest as e:
            if len(batch) > 1:  # one request's bad question must not fail the others: score each alone
                for job in batch:
                    self.score([job])
            else:
                batch[0][1].set_exception(e)
            return
        except Exception as e:  # noqa: BLE001 - delivered to every waiting request (HTTP 5xx), not swallowed
            for _, done in batch:
                done.set_exception(e)
            return
        for items, done in batch:
            done.set_result(scores[:len(items)])
            scores = scores[len(items):]


def make_handler(verifier, token: str = "", max_body: int = 64 << 20, limits: Limits = Limits(),
                 max_batch_images: int = 32, batch_wait_s: float = 0.005):
    """The HTTP handler class for Server; it owns the Batcher (Handler.batcher) of `verifier`."""
    batcher = Batcher(verifier, max_batch_images, batch_wait_s)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 120  # seconds a client may take to send its request (a stalled client frees its thread)

        def handle(self):
            try:
                super().handle()
            except (ConnectionError, TimeoutError) as e:  # the client's fault, not the server's: no traceback
                self.log_message("client hung up or stalled before its reply (%s)", type(e).__name__)

        def log_error(self, format, *args):
            if not format.startswith("Request timed out"):  # an idle kept-alive connection, closed: not news
                super().log_error(format, *args)

        def log_request(self, code="-", size="-"):  # quiet: log errors only
            if str(code)[0] in "45":
                super().log_request(code, size)

        def reply(self, code: int, obj: dict, close: bool = False):
            data = json.dumps(obj).encode()
            self.close_connection = self.close_connection or close
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if close:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)

        def fail(self, code: int, message: str):
            """An error before the body was read: reply and close, since the body is still on the socket."""
            self.reply(code, {"error": message}, close=True)

        def authorized(self) -> bool:
            """Whether the request carries the token (if there is one); if not, it has been answered 401."""
            given = self.headers.get("Authorization", "")
            if not token or hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return True
            self.fail(401, "missing or wrong bearer token (send 'Authorization: Bearer TOKEN')")
            return False

        def do_GET(self):
            if self.path == "/health":  # open without the token: a liveness probe
                counters = {**batcher.counters, **getattr(verifier, "counters", {})}
                return self.reply(200, {"status": "ok", "verifier": verifier.name, **counters})
            if not self.authorized():
                return
            if self.path == "/score":
                return self.fail(405, "use POST /score")
            self.fail(404, f"no such path {self.path!r}; use GET /health or POST /score")

        def do_POST(self):
            if not self.authorized():
                return
            if self.path != "/score":
                return self.fail(404, f"no such path {self.path!r}; use POST /score")
            if self.headers.get("Content-Type", "").split(";")[0].strip().lower() != "application/json":
                return self.fail(415, "the body must be JSON with 'Content-Type: application/json'")
            if self.headers.get("Transfer-Encoding") or self.headers.get("Content-Length") is None:
                return self.fail(411, "a Content-Length header is required (chunked bodies are not accepted)")
            try:
                length = int(self.headers["Content-Length"])
            except ValueError:
                return self.fail(400, f"Content-Length {self.headers['Content-Length']!r} is not a number")
            if length > max_body or length < 0:
                return self.fail(413, f"body of {length} bytes exceeds the limit of {max_body}")
            data = self.rfile.read(length)
            if len(data) < length:  # the client closed its side before the whole body came
                self.close_connection = True
                return self.log_message("client hung up after %d of %d body bytes", len(data), length)
            try:
                body = json.loads(data or b"null")
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
                return self.reply(400, {"error": f"the body is not valid JSON ({type(e).__name__}: {e})"})
            try:
                images, sem, qual = parse_score_request(body, limits)
                result = score_batch(batcher, images, sem, qual)
            except ApiError as e:
                return self.reply(e.status, {"error": str(e)})
            except Exception as e:  # noqa: BLE001 - a 500 naming it for the client, the traceback for the log
                self.log_error("scoring failed:\n%s", "".join(traceback.format_exception(e)))
                return self.reply(500, {"error": f"the verifier failed: {type(e).__name__}: {e}"})
            self.reply(200, result)

    Handler.batcher = batcher
    return Handler


class Server(ThreadingHTTPServer):
    """A thread per connection. socketserver listens with a queue of 5 pending connections: when more clients
    connect at once (trainer processes x reward threads, each opening its own), the kernel drops or resets
    the rest. 1024 covers any trainer; the kernel caps it at net.core.somaxconn."""
    request_queue_size = 1024


# --------------------------------------------------------------------------------------------------
# CLI: serve (the default), score, bench, decompose
# --------------------------------------------------------------------------------------------------


def add_verifier_args(p: argparse.ArgumentParser):
    p.add_argument("--verifier", default="toy",
                   help="'toy', a Qwen-VL instruct model path / hub id, openai:http://HOST:PORT/v1, or "
                   f"random:<{'|'.join(BENCH_SHAPES)}> (random weights at that shape: for benchmarks only)")
    p.add_argument("--model", default="", help="model name at an openai: endpoint")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", ""),
                   help="bearer key of an openai: endpoint (default $OPENAI_API_KEY)")
    p.add_argument("--device", default="auto", help="device of a transformers verifier")
    p.add_argument("--dtype", default="auto", help="dtype of a transformers verifier (auto: bf16 on cuda)")
    p.add_argument("--naive", action="store_true", help="transformers: one full sequence per question")


def load_verifier(args):
    if args.verifier == "toy":
        return ToyVerifier()
    if args.verifier.startswith("openai:"):
        return OpenAIVerifier(args.verifier[len("openai:"):], args.model, args.api_key)
    if args.verifier.startswith("random:"):
        name = args.verifier[len("random:"):]
        if name not in BENCH_SHAPES:
            raise SystemExit(f"--verifier random:{name}: unknown shape; choose one of {sorted(BENCH_SHAPES)}")
        return random_verifier(BENCH_SHAPES[name], device=args.device, dtype=args.dtype,
                               shared_prefix=not args.naive)
    return TransformersVerifier(args.verifier, args.device, args.dtype, shared_prefix=not args.naive)


def cannot_read(path: str, e: Exception) -> SystemExit:
    """A one-line exit for an input file that is missing or unreadable, naming it (no traceback)."""
    return SystemExit(f"reward_server.py: cannot read {path}: {getattr(e, 'strerror', None) or e}")


def read_image(path: str) -> Image.Image:
    """An RGB image from a file, or a one-line exit naming it (missing, unreadable, not an image, truncated)."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as e:
        raise cannot_read(path, e) from None


def check_ranges(p: argparse.ArgumentParser, args, **ranges):
    """Stop with p.error at the first numeric option outside its inclusive (low, high) range (None: open)."""
    for name, (lo, hi) in ranges.items():
        v = getattr(args, name)
        if v is not None and ((lo is not None and v < lo) or (hi is not None and v > hi)):
            allowed = " and ".join(b for b in (lo is not None and f">= {lo}", hi is not None and f"<= {hi}") if b)
            p.error(f"--{name.replace('_', '-')} {v}: must be {allowed}")


def cmd_serve(argv):
    p = argparse.ArgumentParser(prog="reward_server.py", description=__doc__.split("\n\n")[0])
    add_verifier_args(p)
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port; 0 picks a free one (printed at start)")
    p.add_argument("--token", default=os.environ.get("ALPHAGRPO_REWARD_TOKEN", ""),
                   help="require 'Authorization: Bearer TOKEN' (default $ALPHAGRPO_REWARD_TOKEN)")
    p.add_argument("--max-body", type=int, default=64 << 20, help="bytes per request body")
    for f in fields(Limits):
        p.add_argument("--" + f.name.replace("_", "-"), type=int, default=f.default, help=f.metadata["help"])
    p.add_argument("--max-batch-images", type=int, default=32, help="images the worker scores in one batch")
    p.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="how long the worker waits to fill a batch")
    p.add_argument("--exit-with-parent", action="store_true",
                   help="exit when stdin closes (the trainer that started this server passes a pipe, so a "
                   "killed trainer leaves no orphan server)")
    args = p.parse_args(argv)
    check_ranges(p, args, port=(0, 65535), max_body=(1, None), max_batch_images=(1, None),
                 batch_wait_ms=(0, None), **{f.name: (1, None) for f in fields(Limits)})
    if args.exit_with_parent:
        def exit_when_stdin_closes():
            sys.stdin.read()
            os._exit(0)

        threading.Thread(target=exit_when_stdin_closes, daemon=True).start()
    limits = Limits(**{f.name: getattr(args, f.name) for f in fields(Limits)})
    handler = make_handler(load_verifier(args), args.token, args.max_body, limits, args.max_batch_images,
                           args.batch_wait_ms / 1000)
    try:
        server = Server((args.host, args.port), handler)
    except OSError as e:  # the port is taken, the host is not this machine's, ...
        where = f"{args.host}:{args.port}"
        raise SystemExit(f"reward_server.py: cannot listen on {where}: {e.strerror or e}") from None
    print(f"reward server listening on http://{args.host}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


def cmd_score(argv):
    p = argparse.ArgumentParser(prog="reward_server.py score", description="Score one image's questions, to "
                                "check a question set before training.")
    add_verifier_args(p)
    p.add_argument("--image", required=True, help="a PNG or JPEG file")
    p.add_argument("--question", action="append", required=True, help="a semantic question (repeat the flag)")
    p.add_argument("--quality-question", action="append", default=[],
                   help="a quality question (repeat the flag)")
    args = p.parse_args(argv)
    image = read_image(args.image)
    out = score_batch(load_verifier(args), [image], [args.question], [args.quality_question])
    questions = args.question + args.quality_question
    for question, s in zip(questions, out["semantic_scores"][0] + out["quality_scores"][0]):
        print(f"{s:.4f}  {question}")
    print(f"R = sqrt(mean(semantic) * mean(quality)) = {out['rewards'][0]:.4f}")


def pilot(verifier, images: list, prompt: str, semantic: list, quality: list = ()) -> list:
    """The pilot study's second finding (Sec. 2, Fig. 3) for any verifier: per image, a holistic 0-10 score
    (HOLISTIC_INSTRUCTION; the number the verifier generates, / 10) beside each question's s = P(yes) / (P(yes)
    + P(no)) and the DVReward. images: [(name, PIL image)]. Returns one dict per image; "holistic" is None
    where the verifier has no holistic mode (the toy judge) or its answer held no score ("answer" says which)."""
    scores = score_batch(verifier, [im for _, im in images], [list(semantic)] * len(images),
                         [list(quality)] * len(images))
    rows = []
    for k, (name, image) in enumerate(images):
        answer = verifier.answer(image, HOLISTIC_INSTRUCTION.format(prompt=prompt)) if hasattr(
            verifier, "answer") else None
        rows.append({"image": name, "holistic": None if answer is None else holistic_score(answer),
                     "answer": answer, "semantic_scores": scores["semantic_scores"][k],
                     "quality_scores": scores["quality_scores"][k], "dvreward": scores["rewards"][k]})
    return rows


def cmd_pilot(argv):
    p = argparse.ArgumentParser(prog="reward_server.py pilot", description="The pilot study's holistic vs "
                                "decomposed scores (paper Sec. 2, Fig. 3): a VIEScore-style 0-10 score of each "
                                "image beside each question's P(yes) and the DVReward.")
    add_verifier_args(p)
    p.add_argument("--image", action="append", required=True, help="a PNG or JPEG file (repeat the flag)")
    p.add_argument("--prompt", required=True, help="the request the images were drawn for")
    p.add_argument("--question", action="append", required=True, help="a semantic question (repeat the flag)")
    p.add_argument("--quality-question", action="append", default=[],
                   help="a quality question (repeat the flag)")
    p.add_argument("--json", action="store_true", help="print the rows as one JSON list instead")
    args = p.parse_args(argv)
    images = [(path, read_image(path)) for path in args.image]
    rows = pilot(load_verifier(args), images, args.prompt, args.question, args.quality_question)
    if args.json:
        print(json.dumps(rows, indent=1))
        return rows
    for row in rows:
        if row["answer"] is None:
            holistic = "n/a: the toy judge has no holistic mode (it answers only its yes/no grammar)"
        elif row["holistic"] is None:
            holistic = f"n/a: no 0-10 score in the verifier's answer {row['answer']!r}"
        else:
            answer = row["answer"].strip()
            holistic = f"{row['holistic']:.4f}  (the verifier's generated answer {answer!r}, / 10)"
        print(f"{row['image']}\n  holistic 0-10 / 10   {holistic}")
        scores = row["semantic_scores"] + row["quality_scores"]
        for q, s in zip(args.question + args.quality_question, scores):
            print(f"  P(yes)/(P(yes)+P(no)) {s:.4f}  {q}")
        print(f"  DVReward             {row['dvreward']:.4f}")
    return rows


def cmd_bench(argv):
    """Naive vs shared-prefix scoring of a random Qwen3-VL at a chosen shape, beside the one-pass floor, then
    latency over HTTP."""
    p = argparse.ArgumentParser(prog="reward_server.py bench", description=cmd_bench.__doc__)
    p.add_argument("--shape", default="small", choices=sorted(BENCH_SHAPES),
                   help="the model's sizes; each of them can be overridden by its own flag below")
    for key in BENCH_SHAPES["small"]:
        p.add_argument("--" + key.replace("_", "-"), type=int, default=None)
    p.add_argument("--image-px", type=int, default=512,
                   help="images are resized to this square: (px/32)^2 tokens")
    p.add_argument("--questions", type=int, default=16, help="questions per image")
    p.add_argument("--images", type=int, default=4, help="images timed per path")
    p.add_argument("--clients", type=int, default=8, help="concurrent HTTP clients")
    p.add_argument("--seconds", type=float, default=5.0, help="duration of each HTTP load run (0: none)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    check_ranges(p, args, image_px=(32, None), questions=(1, None), images=(1, None), clients=(1, None),
                 seconds=(0, None))
    import torch

    defaults = BENCH_SHAPES[args.shape]  # each overridden by its flag, if given
    shape = {key: defaults[key] if getattr(args, key) is None else getattr(args, key) for key in defaults}
    verifier = random_verifier(shape, args.image_px, args.device, args.dtype, args.seed)
    rng = random.Random(args.seed)
    words = [w for w in TOY_WORDS if w.isalpha()]
    questions = [" ".join(["Is", "the", *rng.choices(words, k=rng.randint(4, 14)), "?"])
                 for _ in range(args.questions)]
    images = [Image.frombytes("RGB", (args.image_px,) * 2, rng.randbytes(3 * args.image_px ** 2))
              for _ in range(args.images)]
    prefix_inputs = verifier.processor(text=[verifier.prefix_text], images=images[:1], return_tensors="pt")
    suffixes = [len(verifier.suffix_ids(q)) for q in questions]
    print(f"bench: random Qwen3-VL, text {shape['layers']} x {shape['hidden']} (heads {shape['heads']}/"
          f"{shape['kv_heads']}), vision {shape['vision_depth']} x {shape['vision_hidden']}, "
          f"{(args.image_px // 32) ** 2} image tokens, prefix {prefix_inputs['input_ids'].shape[1]} tokens, "
          f"suffixes {min(suffixes)}-{max(suffixes)} tokens, {args.questions} questions per image, "
          f"{verifier.device} {str(verifier.model.dtype).removeprefix('torch.')}", flush=True)
    # the floor: system prompt + image + every question's suffix as one sequence, each token read once and
    # nothing computed twice, so no scoring path can do less work
    prefix_text = verifier.prefix_text
    floor_text = prefix_text + "".join(verifier.chat_text(q)[len(prefix_text):] for q in questions)

    def floor(image):
        inputs = verifier.processor(text=[floor_text], images=[image],
                                    return_tensors="pt").to(verifier.device)
        with torch.inference_mode():
            logits = verifier.model(**inputs, logits_to_keep=1).logits
            return logits.float().cpu()  # .cpu() waits for the device

    paths = {"naive": lambda image: verifier.score_naive(image, questions),  # .tolist() waits for the device
             "shared": lambda image: verifier.confidences(verifier.logits_shared([(image, questions)])[0]),
             "floor": floor}
    seconds = dict.fromkeys(paths, 0.0)
    for path in paths.values():
        path(images[0])  # warm-up
    for image in images:  # the paths in turn, so that a busy machine slows them alike
        for name, path in paths.items():
            start = time.perf_counter()
            path(image)
            seconds[name] += time.perf_counter() - start
    diff = max(abs(a - b) for a, b in zip(paths["naive"](images[0]), paths["shared"](images[0])))

    def load(shared: bool) -> dict:
        verifier.shared_prefix = shared
        server = Server(("127.0.0.1", 0), make_handler(verifier))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}/score"
        bodies = [json.dumps({"images": [base64.b64encode(png).decode()], "semantic_questions": [questions],
                              "quality_questions": [[]]}).encode() for png in map(png_bytes, images)]  # once
        headers = {"Content-Type": "application/json"}
        latencies = []
        end = time.monotonic() + args.seconds

        def client(k):
            with requests.Session() as session:
                while time.monotonic() < end:
                    sent = time.perf_counter()
                    body = bodies[k % len(bodies)]
                    session.post(url, data=body, headers=headers, timeout=600).raise_for_status()
                    latencies.append(time.perf_counter() - sent)
                    k += 1

        start = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as clients:
            list(clients.map(client, range(args.clients)))
        wall = time.perf_counter() - start
        server.shutdown()
        server.server_close()
        counters = server.RequestHandlerClass.batcher.counters
        if len(latencies) > 1:
            percentiles = statistics.quantiles(latencies, n=100, method="inclusive")
        else:
            percentiles = latencies * 99
        return {"requests/s": len(latencies) / wall, "questions/s": len(latencies) * len(questions) / wall,
                **{f"latency p{k} (ms)": 1000 * percentiles[k - 1] for k in (50, 90, 99)},
                "requests answered": len(latencies),
                "requests per batch": counters["requests"] / max(counters["batches"], 1)}

    per_s = {name: len(images) * len(questions) / s for name, s in seconds.items()}
    rows = [("questions/s, one image per call", per_s["naive"], per_s["shared"])]
    if args.seconds > 0:
        naive = load(False)
        shared = load(True)
        label = f"HTTP, {args.clients} clients, {args.seconds:g} s"
        rows += [(f"{label}: {key}", naive[key], shared[key]) for key in naive]
    print(f"{'':50}{'naive':>10}{'shared':>10}{'ratio':>9}")
    for name, a, b in rows:
        ratio = f"{b / a:8.2f}x" if "/s" in name or "latency" in name else ""
        print(f"{name:50}{a:10.1f}{b:10.1f}{ratio}")
    ms = {name: 1000 * s / len(images) for name, s in seconds.items()}
    print(f"floor, one forward pass over system prompt + image + all {len(questions)} questions as one "
          f"sequence: {ms['floor']:.1f} ms per image; shared prefix {ms['shared']:.1f} ms, "
          f"{ms['shared'] / ms['floor']:.2f}x the floor; naive {ms['naive']:.1f} ms")
    print(f"max |shared - naive| score difference: {diff:.2e}")


# Offline decomposition (Sec. 4.2): prompts -> validated atomic yes/no questions, by an LLM

DECOMPOSE_INSTRUCTION = """\
You turn a text-to-image prompt into a checklist of atomic yes/no questions that a vision-language model \
answers by looking at a generated image.

Step 1, semantic questions: does the image follow the prompt? Cover every requirement of the prompt (usually \
3 to 8 questions) and tag each with one dimension:
Style (art style, medium), Environment (setting, weather, time of day), Viewpoint (camera angle, framing), \
Existence (an object is present), Count (how many), Attribute (colour, shape, material, size), Action (what \
a subject does), Spatial (relative position), Text (written text), Negative (something the prompt excludes \
is absent).

Step 2, quality questions: is what step 1 asks about rendered well? Build on the objects of step 1 (usually \
3 to 6 questions) and tag each with one aspect:
Geometry (plausible shapes, proportions), Anatomy (bodies, hands, faces), Texture (surfaces, materials), \
Coherence (consistent parts, no stray artefacts), Lighting (light and shadows agree), Physics (support, \
contact, gravity, reflections), Legibility (text is crisp and spelled right), Aesthetics (composition, \
focus).

Rules for every question:
- It starts with Is, Are, Does, Do, Can, Has or Have and ends with "?".
- "Yes" means the image is good: "Is the street free of cars?" for "no cars"; "Are the fingers well \
formed?", not "Are the fingers distorted?".
- One atomic fact: no "or", never two facts in one question.
- Only what can be seen: turn abstract words into visible evidence ("Is there steam rising from the cup?", \
not "Is the coffee hot?").
- Use only the tags above; skip a dimension the prompt does not touch.

Answer with one JSON object and nothing else:
{"semantic_questions": [{"question": "...", "tag": "Existence"}], "quality_questions": [{"question": "...", \
"tag": "Geometry"}]}"""
DECOMPOSE_RETRY = "That answer is not valid ({error}). Answer again with only the JSON object."

# the rule-based validation of decomposed questions (Sec. 4.2, "invalid questions are filtered")
AUXILIARY_VERBS = ("is", "are", "does", "do", "did", "can", "could", "has", "have", "had", "was", "were",
                   "will", "would", "should")
NON_VISUAL_WORDS = ("smell", "smells", "taste", "tastes", "tasty", "delicious", "sounds", "loud", "noisy",
                    "hear", "feel", "feels", "think", "believe", "fragrant")
TEMPERATURES = ("hot", "cold", "warm", "cool", "freezing")  # not visual as predicate: "Is the coffee hot?"
DEFECT_WORDS = ("blurry", "blurred", "distorted", "deformed", "disfigured", "mutated", "malformed",
                "artifact", "artifacts", "garbled", "misspelled", "extra", "missing", "warped", "glitch",
                "glitches")
NEGATIONS = ("no", "not", "none", "without", "free", "absent", "empty", "nothing", "nor")
ABSENCES = NEGATIONS + ("missing", "lacking", "lacks")  # a Negative question asks about an absence
QUESTION_WORDS = (3, 30)  # length bounds, in words


def check_question(q, tags: tuple, quality: bool) -> str | None:
    """Why a decomposed question is invalid (not yes/no, not visual, not atomic, ...); None if valid."""
    if not isinstance(q, dict) or not isinstance(q.get("question"), str):
        return "not a {question, tag} object"
    text = q["question"].strip()
    words = re.findall(r"[a-z']+", text.lower())
    if q.get("tag") not in tags:
        return "tag not in the allowed set"
    if not text.endswith("?") or text.count("?") > 1:
        return "not one question ending with '?'"
    if not words or words[0] not in AUXILIARY_VERBS:
        return "not a yes/no question (must start with an auxiliary verb such as Is/Are/Does)"
    if not QUESTION_WORDS[0] <= len(words) <= QUESTION_WORDS[1]:
        return f"length outside {QUESTION_WORDS[0]}-{QUESTION_WORDS[1]} words"
    if "or" in words:  # "Is it red or blue?" asks for a choice, "Is A red or is B blue?" joins two facts
        return "not atomic ('or': a choice or two facts, not one yes/no fact)"
    if any(w in NON_VISUAL_WORDS for w in words) or words[-1] in TEMPERATURES:
        return "not visual (asks about something that cannot be seen)"
    negated = any(w in NEGATIONS or w.endswith("n't") for w in words)
    if q["tag"] == "Negative" and not (negated or any(w in ABSENCES for w in words)):
        return "a Negative question must ask about an absence, so that 'yes' means good"
    if quality and not negated and any(w in DEFECT_WORDS for w in words):
        return "'yes' would mean a defect"
    return None


def validate_questions(qs, tags: tuple, quality: bool, seen: set) -> tuple[list, list]:
    """-> (kept [{question, tag}], dropped [(question, reason)]); seen: normalized questions kept so far."""
    kept = []
    dropped = []
    for q in qs if isinstance(qs, list) else []:
        reason = check_question(q, tags, quality)
        if reason is None:
            key = " ".join(re.findall(r"[a-z0-9']+", q["question"].lower()))
            if key not in seen:
                seen.add(key)
                kept.append({"question": q["question"].strip(), "tag": q["tag"]})
                continue
            reason = "duplicate"
        dropped.append((q.get("question") if isinstance(q, dict) else q, reason))
    return kept, dropped


def parse_llm_json(text: str) -> dict:
    """The LLM's decomposition answer as a dict, past a <think> block or ```json fence; else ValueError."""
    text = text.split("</think>")[-1].strip()
    fence = re.search(r"```(?:json)?\s*(.*?)```", text, re.DOTALL)
    text = fence.group(1) if fence else text[text.find("{"):text.rfind("}") + 1]
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON: {e}") from None
    keys = ("semantic_questions", "quality_questions")
    if not isinstance(obj, dict) or not all(isinstance(obj.get(k), list) for k in keys):
        raise ValueError("the JSON object needs 'semantic_questions' and 'quality_questions' lists")
    return obj


def make_llm(args):
    """ask(messages) -> str, from an OpenAI-compatible URL or a local transformers causal LM (greedy)."""
    if args.llm.startswith(("http://", "https://")):
        chat = OpenAIVerifier(args.llm, args.model or "default", args.api_key)  # for its retrying post()

        def ask(messages):
            answer = chat.post({"model": chat.model, "messages": messages, "temperature": 0,
                                "max_tokens": args.max_new_tokens})
            try:
                return answer["choices"][0]["message"]["content"] or ""
            except (KeyError, IndexError, TypeError):
                raise UpstreamError(f"{chat.url} answered without choices[0].message.content", 502) from None
        return ask
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = pick_device(args.device)[0]
    tokenizer = AutoTokenizer.from_pretrained(args.llm)
    model = AutoModelForCausalLM.from_pretrained(args.llm, dtype="auto").to(device).eval()

    def ask(messages):
        inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True).to(device)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return ask


def decompose_row(ask, row: dict) -> tuple[dict | None, str, list]:
    """One prompt row -> (the row with its DVReward questions and its other fields, or None; why None;
    dropped [(question, reason)]): the LLM's decomposition (one retry, told what was wrong), validated."""
    messages = [{"role": "system", "content": DECOMPOSE_INSTRUCTION},
                {"role": "user", "content": f"Prompt: {row['prompt']}"}]
    for _ in range(2):
        answer = ask(messages)
        try:
            parsed = parse_llm_json(answer)
            break
        except ValueError as e:
            error = e
            messages = messages + [{"role": "assistant", "content": answer},
                                   {"role": "user", "content": DECOMPOSE_RETRY.format(error=e)}]
    else:
        return None, f"the LLM answer is not valid JSON after a retry ({error})", []
    seen = set()
    semantic, dropped = validate_questions(parsed["semantic_questions"], SEMANTIC_TAGS, False, seen)
    quality, dropped_quality = validate_questions(parsed["quality_questions"], QUALITY_TAGS, True, seen)
    out = {"prompt": row["prompt"], "semantic_questions": semantic, "quality_questions": quality}
    out.update({k: v for k, v in row.items() if k not in out})
    return (out if semantic else None), "no valid semantic question left", dropped + dropped_quality


def read_prompt_rows(path: str) -> tuple[list, list]:
    """-> ([(line number, row)], problems): plain-text prompts (one a line) or JSONL rows with a 'prompt'."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as e:  # missing, a folder, not readable, not UTF-8
        raise cannot_read(path, e) from None
    rows = []
    problems = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:  # a JSONL row, or else a plain-text prompt
            row = json.loads(line) if line.lstrip().startswith("{") else {"prompt": line}
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("prompt"), str) and row["prompt"].strip():
            rows.append((n, {**row, "prompt": row["prompt"].strip()}))
        else:
            problems.append(f"{path}:{n}: not a JSON object with a non-empty 'prompt'; row skipped")
    return rows, problems


def add_llm_args(p: argparse.ArgumentParser):
    """The LLM and output flags that `decompose` and `synthesize` share."""
    p.add_argument("--llm", required=True,
                   help="a causal LM path / hub id, or an OpenAI-compatible URL .../v1")
    p.add_argument("--model", default="", help="model name at an OpenAI-compatible --llm")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", ""))
    p.add_argument("--out", required=True, help="output JSONL (the trainer's prompts.jsonl format)")
    p.add_argument("--workers", type=int, default=8, help="prompts in flight at an OpenAI-compatible --llm")
    p.add_argument("--device", default="auto")
    p.add_argument("--max-new-tokens", type=int, default=1024)


def cmd_decompose(argv):
    """Decompose prompts into DVReward questions with an LLM (Sec. 4.2, offline)."""
    p = argparse.ArgumentParser(prog="reward_server.py decompose", description=cmd_decompose.__doc__)
    p.add_argument("input", help="plain-text prompts (one a line) or JSONL rows with a 'prompt' (other "
                   "fields kept)")
    add_llm_args(p)
    args = p.parse_args(argv)
    check_ranges(p, args, workers=(1, None), max_new_tokens=(1, None))
    rows, problems = read_prompt_rows(args.input)
    ask = make_llm(args)

    def decompose(job):  # -> (line number, output row or None, why None, dropped [(question, reason)])
        return (job[0], *decompose_row(ask, job[1]))

    written = 0
    total = 0
    reasons = {}  # why a question was dropped -> how many
    workers = args.workers if args.llm.startswith(("http://", "https://")) else 1  # local: one at a time
    with ThreadPoolExecutor(max(workers, 1)) as pool, open(args.out, "w", encoding="utf-8") as f:
        for n, out, problem, dropped in pool.map(decompose, rows):
            for q, reason in dropped:
                print(f"{args.input}:{n}: dropped {q!r}: {reason}", file=sys.stderr)
                reasons[reason] = reasons.get(reason, 0) + 1
            total += len(dropped)
            if out is None:
                problems.append(f"{args.input}:{n}: {problem}; row skipped")
            else:
                total += len(out["semantic_questions"]) + len(out["quality_questions"])
                f.write(json.dumps(out, ensure_ascii=False) + "\n")
                written += 1
    if problems:
        print("\n".join(problems), file=sys.stderr)
    print(f"wrote {written} rows to {args.out}; skipped {len(problems)} rows")
    print(f"dropped {sum(reasons.values())} of {total} questions")
    for reason, count in sorted(reasons.items(), key=lambda x: -x[1]):
        print(f"  {count:5d}  {reason}")


# Sec. 4.3, Primitive-to-Prompt: a pool of visual primitives, compositional tasks, an LLM that writes a prompt
# from sampled primitives, three tiers in 3:5:2, then the decomposition above. The tasks are TIIF-Bench's 39
# prompt types (the file names of its data/test_prompts), each a combination of the dimensions below.
TIIF_TASKS = (
    "2d_spatial_relation", "3d_spatial_relation", "style", "text", "real_world", "color+texture", "texture+color",
    *(f"{a}+{b}" for a in ("action", "shape", "texture", "color") for b in ("2d", "3d", "color", "texture")
      if a != b and {a, b} != {"color", "texture"}),
    *(f"{a}{b}" for a in ("comparison", "differentiation", "negation", "numeracy")
      for b in ("", "+2d", "+3d", "+color", "+texture")))
# dimension: what a prompt of it must test, and the pool entry it samples (one per object, or one per prompt)
DIMENSIONS = {
    "2d": ("where the objects are in the picture plane", "relations_2d", False),
    "3d": ("depth: what is in front of, behind or hidden by what", "relations_3d", False),
    "color": ("the colour of each object, bound to it", "colours", True),
    "texture": ("the material or surface of each object, bound to it", "materials", True),
    "shape": ("the shape of each object, bound to it", "shapes", True),
    "action": ("what a person or animal is doing", "actions", False),
    "numeracy": ("exact counts of objects", "counts", True),
    "comparison": ("a visible comparison between objects", "comparisons", False),
    "differentiation": ("two objects of one kind told apart by an attribute", "colours", True),
    "negation": ("something explicitly absent or not happening", "objects", False),
    "style": ("an art style or medium", "styles", False),
    "text": ("a short text, quoted, written in the image", "texts", False),
    "real_world": ("an everyday request as a user would write it", "settings", False),
}
TIERS = {"easy": (0.3, 1, "one or two constraints, one short sentence"),
         "medium": (0.5, 2, "three or four constraints"),
         "hard": (0.2, 3, "many bound constraints, a setting and the lighting, up to two sentences")}
DEFAULT_POOL = {  # man-made things and animals that take most colours and materials
    "objects": "apple backpack bench bicycle boat book bottle bowl candle car cat chair clock cup dog guitar "
               "hat horse kite lamp laptop suitcase teapot umbrella vase".split(),
    "colours": "red orange yellow green blue purple pink white black brown grey".split(),
    "materials": "wooden metal glass ceramic plastic leather woollen stone paper marble".split(),
    "shapes": "round square triangular oval star-shaped heart-shaped cylindrical hexagonal".split(),
    "relations_2d": ["to the left of", "to the right of", "above", "below", "on top of", "next to"],
    "relations_3d": ["in front of", "behind", "partly hidden behind", "far behind", "inside"],
    "actions": ["a woman reading", "a man running", "a child jumping", "a dog sleeping", "a cat climbing",
                "a girl painting", "a horse galloping", "an old man cooking"],
    "counts": "two three four five six".split(),
    "comparisons": ["bigger than", "taller than", "more numerous than", "brighter than", "older than"],
    "styles": ["watercolour", "oil painting", "pixel art", "pencil sketch", "3D render", "ukiyo-e print",
               "photograph", "comic book"],
    "texts": ["OPEN", "SALE 50%", "Hello World", "CAFE", "EXIT", "Happy Birthday", "NO PARKING", "2026"],
    "settings": ["a kitchen", "a beach at sunset", "a snowy street", "a forest clearing", "an office",
                 "a market", "a rooftop at night", "a library"],
    "lighting": ["soft morning light", "harsh noon sun", "candlelight", "neon light", "overcast light"],
}
SYNTHESIZE_INSTRUCTION = """\
You write prompts for training a text-to-image model. Write one prompt for the task "{task}": it must test \
{what}. Build it from these elements (change their grammar, not their meaning; fix an implausible pairing \
with the smallest change): {elements}. Difficulty {tier}: {hint}. Describe only what can be seen, concretely. \
Answer with the prompt only, no quotes, no preamble."""
SYNTHESIZE_RETRY = "That is not a prompt ({error}). Answer with the prompt only, 6 to 80 words."


def load_pool(path: str) -> dict:
    """A primitive pool (JSON): the default's keys, each a non-empty list of non-empty strings."""
    if not path:
        return DEFAULT_POOL
    try:
        with open(path, encoding="utf-8") as f:
            pool = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SystemExit(f"reward_server.py: --pool {path}: cannot read a JSON pool ({e})") from None
    if not isinstance(pool, dict):
        raise SystemExit(f"reward_server.py: --pool {path}: must be a JSON object of lists")
    for key in DEFAULT_POOL:
        values = pool.get(key)
        if not (isinstance(values, list) and values and all(isinstance(v, str) and v.strip() for v in values)):
            raise SystemExit(f"reward_server.py: --pool {path}: '{key}' must be a non-empty list of non-empty "
                             "strings (README, 'Making a prompt set')")
    return pool


def tier_counts(n: int) -> dict:
    """n prompts in the 3:5:2 tiers, exactly (largest remainders)."""
    share = {t: n * r for t, (r, _, _) in TIERS.items()}
    counts = {t: int(v) for t, v in share.items()}
    for t in sorted(share, key=lambda t: counts[t] - share[t])[:n - sum(counts.values())]:
        counts[t] += 1
    return counts


def sample_primitives(pool: dict, task: str, tier: str, rng: random.Random) -> dict:
    """The elements of one prompt: 1-3 objects by tier (2-4 where the task relates objects), and for each of the
    task's dimensions one pool entry per object or per prompt; hard adds a setting and the lighting."""
    dims = task.replace("_spatial_relation", "").split("+")
    n = TIERS[tier][1] + any(d in ("2d", "3d", "comparison", "differentiation") for d in dims)
    objects = rng.sample(pool["objects"], n)
    out = {"objects": objects}
    for d in dims:
        key, per_object = DIMENSIONS[d][1:]
        out[d] = [rng.choice(pool[key]) for _ in objects] if per_object else rng.choice(pool[key])
    if tier == "hard":
        out.update(setting=rng.choice(pool["settings"]), lighting=rng.choice(pool["lighting"]))
    return out


def read_done(path: str) -> list:
    """The rows of a (possibly interrupted) output file; a last line cut off mid-write is removed."""
    lines = []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    if lines and not lines[-1].endswith("\n"):  # killed mid-write: drop the partial line
        lines = lines[:-1]
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(lines)
    try:
        return [json.loads(line) for line in lines]
    except json.JSONDecodeError as e:
        raise SystemExit(f"reward_server.py: {path}: not an output of synthesize ({e})") from None


def cmd_synthesize(argv):
    """Make a prompt set like the paper's (Sec. 4.3): prompts written by an LLM from sampled primitives,
    decomposed into DVReward questions; resumable."""
    from tqdm import tqdm

    p = argparse.ArgumentParser(prog="reward_server.py synthesize", description=cmd_synthesize.__doc__)
    add_llm_args(p)
    p.add_argument("--per-task", type=int, default=500, help="train prompts per task (paper: 500)")
    p.add_argument("--test-per-task", type=int, default=26, help="test prompts per task (paper: 1,024 in all)")
    p.add_argument("--pool", default="", help="a JSON primitive pool (default: DEFAULT_POOL)")
    p.add_argument("--tasks", default="", help="comma-separated task names (default: TIIF-Bench's 39)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    check_ranges(p, args, workers=(1, None), max_new_tokens=(1, None), per_task=(0, None),
                 test_per_task=(0, None))
    pool = load_pool(args.pool)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] or list(TIIF_TASKS)
    unknown = [t for t in tasks if t not in TIIF_TASKS]
    if unknown:
        p.error(f"--tasks: unknown task(s) {unknown} (known: {', '.join(TIIF_TASKS)})")
    ask = make_llm(args)
    dropped_path = args.out + ".dropped.jsonl"  # what was dropped and why: the resume and the summary read it
    kept, dropped = read_done(args.out), read_done(dropped_path)
    words = lambda text: " ".join(re.findall(r"[a-z0-9]+", text.lower()))  # noqa: E731 (near-duplicates)
    texts = {words(r["prompt"]) for r in kept}
    picks = {(r["task"], json.dumps(r["primitives"], sort_keys=True)) for r in kept + dropped if "primitives" in r}

    def write(prompt_row):  # one prompt: the LLM writes it, then `decompose_row` (or why it was dropped)
        task, split, tier, attempt, prims = prompt_row
        what = " and ".join(DIMENSIONS[d][0] for d in task.replace("_spatial_relation", "").split("+"))
        messages = [{"role": "user", "content": SYNTHESIZE_INSTRUCTION.format(
            task=task, what=what, elements=json.dumps(prims), tier=tier, hint=TIERS[tier][2])}]
        for _ in range(2):
            answer = ask(messages).split("</think>")[-1].strip().strip('"')
            n_words = len(answer.split())
            if 6 <= n_words <= 80 and "\n\n" not in answer and "{" not in answer:
                row = {"prompt": " ".join(answer.split()), "split": split, "task": task, "difficulty": tier,
                       "primitives": prims, "attempt": attempt}
                out, why, _ = decompose_row(ask, row)
                return row, out, why
            messages += [{"role": "assistant", "content": answer},
                         {"role": "user", "content": SYNTHESIZE_RETRY.format(error=f"{n_words} words")}]
        return {"task": task, "split": split, "difficulty": tier, "attempt": attempt}, None, \
            "the LLM wrote no prompt after a retry"

    workers = args.workers if args.llm.startswith(("http://", "https://")) else 1
    with ThreadPoolExecutor(max(workers, 1)) as threads, open(args.out, "a", encoding="utf-8") as out_f, \
            open(dropped_path, "a", encoding="utf-8") as drop_f:
        def drop(row, why):
            dropped.append({**row, "why": why})
            drop_f.write(json.dumps(dropped[-1], ensure_ascii=False) + "\n")

        while True:  # passes: a dropped prompt is redrawn, up to 3 attempts a prompt in all (over resumes too)
            jobs = []
            for task, split, n in ((t, s, n) for t in tasks for s, n in (("train", args.per_task),
                                                                         ("test", args.test_per_task))):
                for tier, target in tier_counts(n).items():
                    mine = [r for r in kept + dropped
                            if (r["task"], r["split"], r["difficulty"]) == (task, split, tier)]
                    attempt = 1 + max([r["attempt"] for r in mine], default=-1)
                    for attempt in range(attempt, attempt + min(target - sum("why" not in r for r in mine),
                                                                3 * target - len(mine))):
                        prims = sample_primitives(pool, task, tier, random.Random(
                            f"{args.seed}/{task}/{split}/{tier}/{attempt}"))
                        key = (task, json.dumps(prims, sort_keys=True))
                        if key in picks:
                            drop({"task": task, "split": split, "difficulty": tier, "attempt": attempt,
                                  "primitives": prims}, "the same primitives in the same task")
                        else:
                            picks.add(key)
                            jobs.append((task, split, tier, attempt, prims))
            if not jobs:
                break
            for row, out, why in tqdm(threads.map(write, jobs), total=len(jobs), desc="synthesize"):
                text = words(row.get("prompt", ""))
                if out is not None and text in texts:
                    out, why = None, "a near-duplicate of a kept prompt"
                if out is None:
                    drop(row, why)
                else:
                    texts.add(text)
                    kept.append(out)
                    out_f.write(json.dumps(out, ensure_ascii=False) + "\n")
                out_f.flush()
                drop_f.flush()
    print("| task | kept / asked: easy, medium, hard | dropped, by reason |\n|---|---|---|")
    for task in tasks:
        asked = [(sum(r["task"] == task and r["difficulty"] == t for r in kept),
                  sum(r["task"] == task and r["difficulty"] == t for r in kept + dropped)) for t in TIERS]
        reasons = collections.Counter(r["why"] for r in dropped if r["task"] == task)
        print(f"| {task} | {', '.join(f'{k} / {n}' for k, n in asked)} | "
              f"{'; '.join(f'{w}: {c}' for w, c in reasons.items()) or '-'} |")
    print(f"wrote {len(kept)} prompts to {args.out} ({sum(r['split'] == 'test' for r in kept)} test); dropped "
          f"{len(dropped)}, listed in {dropped_path}")


COMMANDS = {"serve": cmd_serve, "score": cmd_score, "pilot": cmd_pilot, "bench": cmd_bench,
            "decompose": cmd_decompose, "synthesize": cmd_synthesize}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    command = COMMANDS[argv.pop(0)] if argv and argv[0] in COMMANDS else cmd_serve  # default: serve
    try:
        return command(argv)
    except (ApiError, OSError) as e:  # a question the verifier rejects, an endpoint that keeps failing,
        raise SystemExit(f"reward_server.py: {e}") from None  # a file or port it cannot use: one line


if __name__ == "__main__":
    main()
