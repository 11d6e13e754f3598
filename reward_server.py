"""DVReward server: the Decompositional Verifiable Reward of AlphaGRPO (paper Sec. 4.2) over HTTP.

An MLLM verifier answers each atomic yes/no question about an image; the confidence of one question is
s = P(yes) / (P(yes) + P(no)) from the first answer token, and the reward of an image is the geometric mean
R = sqrt(mean(s_semantic) * mean(s_quality)). The questions are decomposed offline (prompts.jsonl).

    python reward_server.py --verifier Qwen/Qwen3-VL-8B-Instruct --port 8000   # a transformers verifier
    python reward_server.py --verifier toy --port 8000                         # the rule-based toy judge

API (JSON; images are base64 PNG, never pickle):
    GET  /health  -> {"status": "ok", "verifier": ...}
    POST /score   {"images": [b64], "semantic_questions": [[str]], "quality_questions": [[str]]}
               -> {"rewards": [float], "semantic_scores": [[float]], "quality_scores": [[float]]}
One question list per image; an empty list scores 1.0. A malformed request gets HTTP 400 {"error": ...}.
"""
from __future__ import annotations

import argparse
import base64
import binascii
import io
import json
import math
import os
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image, ImageStat

STRICT_AUDITOR = (
    "You are a strict visual auditor. You check generated images against a checklist. Look at the image "
    "carefully and answer the question with one word, Yes or No. Answer Yes only if the image clearly shows it."
)
YES_VARIANTS = ("Yes", "yes", "YES", " Yes", " yes", " YES")
NO_VARIANTS = ("No", "no", "NO", " No", " no", " NO")


class BadRequest(ValueError):
    """A request the server cannot score; the message names the problem (HTTP 400)."""


def confidence(yes_logits, no_logits) -> float:
    """s = P(yes) / (P(yes) + P(no)) (Sec. 4.2, confidence scoring), where P(yes) sums the probabilities of
    all "yes" token variants; the softmax's normalizer cancels, so logits suffice."""
    def lse(xs):
        m = max(xs)
        return m + math.log(sum(math.exp(x - m) for x in xs))

    return 1.0 / (1.0 + math.exp(lse(no_logits) - lse(yes_logits)))


def dvreward(semantic: list, quality: list) -> float:
    """R = sqrt(mean(s_semantic) * mean(s_quality)) (Sec. 4.2); an empty list counts as 1.0."""
    mean = lambda xs: sum(xs) / len(xs) if xs else 1.0  # noqa: E731
    return math.sqrt(mean(semantic) * mean(quality))


class ToyVerifier:
    """A rule-based judge for the toy preset. It answers a closed grammar of questions about colours,
    `Is the image [mostly] <colour>?` and `Is the (top|bottom|left|right) half of the image <colour>?`,
    with Yes/No logits proportional to a colour margin, so rewards are graded and the DVReward arithmetic
    is the same as with an MLLM. Any other question is a 400, never a guess."""

    name = "toy"
    COLOURS = {"red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1), "yellow": (1, 1, 0), "cyan": (0, 1, 1),
               "magenta": (1, 0, 1), "white": (1, 1, 1), "black": (0, 0, 0)}
    PATTERN = re.compile(r"is the (?:image(?: mostly)?|(top|bottom|left|right) half of the image) (\w+)\s*\?",
                         re.IGNORECASE)
    GAIN = 8.0  # logit per unit of colour margin

    def answer_logits(self, image: Image.Image, question: str) -> tuple[float, float]:
        m = self.PATTERN.fullmatch(question.strip())
        if not m or m.group(2).lower() not in self.COLOURS:
            raise BadRequest(f"the toy verifier cannot answer {question!r}: it knows only 'Is the image [mostly] "
                             f"<colour>?' and 'Is the top|bottom|left|right half of the image <colour>?' with a "
                             f"colour in {', '.join(self.COLOURS)}")
        w, h = image.size
        box = {None: (0, 0, w, h), "top": (0, 0, w, h // 2), "bottom": (0, h // 2, w, h),
               "left": (0, 0, w // 2, h), "right": (w // 2, 0, w, h)}[m.group(1) and m.group(1).lower()]
        rgb = [c / 255 for c in ImageStat.Stat(image.convert("RGB").crop(box)).mean]
        dist = {name: math.dist(rgb, ref) for name, ref in self.COLOURS.items()}
        target = m.group(2).lower()
        # margin > 0 iff the region's mean colour is closer to the target than to any other colour
        margin = min(d for name, d in dist.items() if name != target) - dist[target]
        return self.GAIN * margin, 0.0

    def score(self, image: Image.Image, questions: list[str]) -> list[float]:
        return [confidence([y], [n]) for y, n in (self.answer_logits(image, q) for q in questions)]


class TransformersVerifier:
    """A Qwen-VL instruct model from transformers: for each question, one forward pass over system prompt,
    image and question, and the first answer token's yes/no probabilities."""

    def __init__(self, path: str, device: str = "auto", dtype: str = "auto"):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.torch = torch
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   "cpu" if device == "auto" else device)
        dt = (torch.bfloat16 if self.device.type == "cuda" else torch.float32) if dtype == "auto" else getattr(torch, dtype)
        self.name = path
        self.processor = AutoProcessor.from_pretrained(path)
        self.model = AutoModelForImageTextToText.from_pretrained(path, dtype=dt).to(self.device).eval()
        tok = self.processor.tokenizer
        # every single-token spelling of yes / no, found with the tokenizer at start-up (an unknown-token
        # id would count any unknown word as a yes, so each id must decode back to the word)
        def ids(words):
            found = set()
            for w in words:
                i = tok.encode(w, add_special_tokens=False)
                if len(i) == 1 and i[0] != tok.unk_token_id and tok.decode(i).strip().lower() == w.strip().lower():
                    found.add(i[0])
            return sorted(found)

        self.yes_ids, self.no_ids = ids(YES_VARIANTS), ids(NO_VARIANTS)
        if not self.yes_ids or not self.no_ids:
            raise ValueError(f"{path}: the tokenizer has no single-token 'yes'/'no'; it cannot be a verifier")
        probe = self.chat_text("Is it?")
        if "<think>" in probe[-40:]:
            raise ValueError(f"{path}: its chat template opens a <think> block; use an Instruct (non-thinking) model, "
                             "since the first answer token must be the yes/no")

    def chat_text(self, question: str) -> str:
        messages = [{"role": "system", "content": STRICT_AUDITOR},
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def score(self, image: Image.Image, questions: list[str]) -> list[float]:
        if not questions:
            return []
        torch = self.torch
        texts = [self.chat_text(q) for q in questions]
        inputs = self.processor(text=texts, images=[image] * len(texts), padding=True, padding_side="left",
                                return_tensors="pt").to(self.device)
        with torch.no_grad():
            logits = self.model(**inputs, logits_to_keep=1).logits[:, -1].float()  # (n, V): the first answer token
        return [confidence(row[self.yes_ids].tolist(), row[self.no_ids].tolist()) for row in logits]


def decode_png(b64, where: str) -> Image.Image:
    if not isinstance(b64, str):
        raise BadRequest(f"{where} must be a base64 string, got {type(b64).__name__}")
    try:
        data = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{where} is not valid base64") from None
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise BadRequest(f"{where} is not a PNG image")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (OSError, SyntaxError, ValueError) as e:
        raise BadRequest(f"{where} is a broken PNG ({e})") from None
    return image.convert("RGB")


def parse_score_request(body: dict) -> tuple[list, list, list]:
    """Validate a /score body; raises BadRequest naming the field."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    for key in ("images", "semantic_questions", "quality_questions"):
        if not isinstance(body.get(key), list):
            raise BadRequest(f"'{key}' is missing or not a list")
    n = len(body["images"])
    for key in ("semantic_questions", "quality_questions"):
        if len(body[key]) != n:
            raise BadRequest(f"'{key}' has {len(body[key])} lists for {n} images (one list per image)")
        for i, qs in enumerate(body[key]):
            if not isinstance(qs, list) or not all(isinstance(q, str) and q.strip() for q in qs):
                raise BadRequest(f"'{key}'[{i}] must be a list of non-empty strings")
    images = [decode_png(b, f"images[{i}]") for i, b in enumerate(body["images"])]
    return images, body["semantic_questions"], body["quality_questions"]


def score_batch(verifier, images, semantic, quality) -> dict:
    out = {"rewards": [], "semantic_scores": [], "quality_scores": []}
    for image, sem, qual in zip(images, semantic, quality):
        s = verifier.score(image, list(sem) + list(qual))
        out["semantic_scores"].append(s[:len(sem)])
        out["quality_scores"].append(s[len(sem):])
        out["rewards"].append(dvreward(s[:len(sem)], s[len(sem):]))
    return out


def make_handler(verifier, token: str = "", max_body: int = 64 << 20):
    lock = threading.Lock()  # the model is not thread-safe: one request at a time uses it

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def reply(self, code: int, obj: dict):
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_request(self, code="-", size="-"):  # quiet: log errors only
            if str(code)[0] in "45":
                super().log_request(code, size)

        def do_GET(self):
            if self.path == "/health":
                return self.reply(200, {"status": "ok", "verifier": verifier.name})
            self.reply(404, {"error": f"no such path {self.path!r}; use GET /health or POST /score"})

        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            if self.path != "/score":
                self.rfile.read(length)
                return self.reply(404, {"error": f"no such path {self.path!r}; use POST /score"})
            if token and self.headers.get("Authorization") != f"Bearer {token}":
                self.rfile.read(length)
                return self.reply(401, {"error": "missing or wrong bearer token"})
            if length > max_body:
                self.close_connection = True
                return self.reply(413, {"error": f"body of {length} bytes exceeds the limit of {max_body}"})
            try:
                body = json.loads(self.rfile.read(length) or b"null")
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                return self.reply(400, {"error": f"the body is not valid JSON ({e})"})
            try:
                images, sem, qual = parse_score_request(body)
                with lock:
                    result = score_batch(verifier, images, sem, qual)
            except BadRequest as e:
                return self.reply(400, {"error": str(e)})
            self.reply(200, result)

    return Handler


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--verifier", default="toy", help="'toy' or a Qwen-VL instruct model path / hub id")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port; 0 picks a free one (printed at start)")
    p.add_argument("--token", default=os.environ.get("ALPHAGRPO_REWARD_TOKEN", ""),
                   help="require 'Authorization: Bearer TOKEN' (default $ALPHAGRPO_REWARD_TOKEN)")
    p.add_argument("--device", default="auto", help="device of a transformers verifier")
    p.add_argument("--dtype", default="auto", help="dtype of a transformers verifier (auto: bf16 on cuda)")
    args = p.parse_args(argv)
    verifier = ToyVerifier() if args.verifier == "toy" else TransformersVerifier(args.verifier, args.device, args.dtype)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(verifier, args.token))
    print(f"reward server listening on http://{args.host}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
