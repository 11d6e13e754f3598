"""AlphaGRPO, a minimal reference implementation.

Paper: "AlphaGRPO: Unlocking Self-Reflective Multimodal Generation in Unified Multimodal Models via
Decompositional Verifiable Reward" (https://huangrh99.github.io/AlphaGRPO/). Read it beside this file:
the method comes first and in the paper's order (Sec. 3 preliminaries -> Sec. 4.1 AlphaGRPO and FPR ->
arguments -> models -> rollouts -> the objective -> the loop -> inference -> main); the comments name the
section or equation that each line computes. An APPENDIX after `main` holds what a reader of the method can
skip: the command line, model loading, the decoupled policy's renderers (klein, SD3.5), the reward client,
metrics, checkpoints, the toy models and their priors, benchmark outputs, the memory plan, dry run and bench.

What is implemented
- The unified trajectory o = (y, x_T..x_0) (Sec. 4.1): a reasoner writes text y, then a renderer draws the
  image conditioned on the prompt and y. Both are trained by GRPO with one shared group advantage.
- Text: token-level PPO clip with clip-higher, k3 KL, optional sequence-level (GSPO) ratio (Sec. 3).
- Image: Flow-GRPO's SDE sampler with a closed-form Gaussian log-prob and KL (Sec. 3), trained only
  inside a window of W consecutive steps.
- Reasoning text-to-image (RT2I) and Self-Reflective Refinement (SRR) with False-Positive Rectification
  (Sec. 4.1), the refinement generated with the initial image in context; rewards from the DVReward server
  (`reward_server.py`, Sec. 4.2) over HTTP, asynchronously.
- Inference-time refinement as the paper evaluates it: one round that refines only the images a benchmark's
  scorer marked wrong (`eval --refine-only-wrong`); without the answers, a gate on the verifier's confidences.

Two policies behind one interface (`Reasoner`, `Renderer`). Unified (`--policy unified`, the paper's setting):
one Cosmos3 network reasons and draws; its understanding stream is the Qwen3-VL language model that writes the
reasoning (transformers) and the context its generation stream denoises the image from (diffusers), the same
tensors in both. As the official code trains BAGEL, that context is computed once per sample without gradient
and cached (every denoising step reads it, the whole group in one pass): the text loss trains the shared
stream, the image loss the generation stream (`--context-grad`: the image loss reaches both). Decoupled (the
default): a Qwen3-VL reasoner beside FLUX.2 klein (which edits in context) or Stable Diffusion 3.5 (which
cannot, the Flow-GRPO-comparable one). The toy preset builds the same classes at tiny sizes with a short
supervised prior, so every code path runs on a laptop CPU.

Left out: full fine-tuning, FSDP/DeepSpeed, BAGEL itself (not in transformers or diffusers; Cosmos3 is the
same design), the benchmarks' scorers (`eval` writes their input trees), re-implementing the official code's
top-p sampling (off-policy: see README).

Launch
    python alphagrpo.py                         # the toy world on the CPU, with its own toy reward server
    python alphagrpo.py --task srr              # Self-Reflective Refinement with FPR, in context
    python alphagrpo.py --policy unified        # one network reasons and draws (a tiny Cosmos3)
    python reward_server.py --verifier Qwen/Qwen3-VL-8B-Instruct --port 8000           # on a GPU
    python alphagrpo.py --preset klein --reward-url http://127.0.0.1:8000              # on an 80 GB GPU
    python alphagrpo.py --preset cosmos3 --reward-url http://127.0.0.1:8000            # unified, 80 GB
    python alphagrpo.py --preset cosmos3-edge --reward-url http://127.0.0.1:8000       # unified, 24-48 GB
    python alphagrpo.py sample --prompt "a calm sea below" --refine-rounds 2 --refine-below question
    python alphagrpo.py eval --benchmark geneval --data geneval/prompts/evaluation_metadata.jsonl --out DIR
    python alphagrpo.py eval ... --out DIR --refine-rounds 1 --refine-only-wrong DIR/round_0_scores/results.jsonl
    python alphagrpo.py bench --preset klein    # GPU figures at real shapes, random weights (README)
    python alphagrpo.py bench --preset cosmos3 --layers 1 --no-train-step --group-size 2   # a CPU-sized slice

Shapes: G group size, L generated tokens, P prompt tokens, V vocabulary, C latent channels,
h x w latent size, W trained (SDE) steps, T sampling steps.
"""
from __future__ import annotations

import argparse
import ast
import base64
import contextlib
import dataclasses
import fnmatch
import hashlib
import inspect
import io
import json
import math
import os
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import requests
import torch
import torch.nn as nn
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file
from tqdm import tqdm

# the DVReward tag lists, and the toy's Qwen3-VL builder, vocabulary and judge (the toy world uses them)
from reward_server import QUALITY_TAGS, SEMANTIC_TAGS, dvreward
from reward_server import TOY_CHAT_TEMPLATE, TOY_WORDS, ToyVerifier, make_vlm, toy_tokenizer

# transformers and diffusers take seconds to import: the functions that need them import them.


# --------------------------------------------------------------------------------------------------
# Sec. 3: GRPO for language and for flow matching, as pure functions
# --------------------------------------------------------------------------------------------------


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, std_mode: str = "group",
                     eps: float = 1e-4, batch_std: float | None = None, adv_clip: float = math.inf):
    """A_i = clip((R_i - mean_group(R)) / (std + eps), -adv_clip, adv_clip), one scalar per trajectory
    (Sec. 3, GRPO), shared by its text and its image (Sec. 4.1): clipped here, once, so both halves see it.

    rewards, group_ids: (N,). std is the population std (ddof=0, + 1e-4 as Flow-GRPO) of the group
    ('group') or of all N rewards ('batch'; batch_std overrides it, e.g. with all ranks' rewards). A group
    whose rewards are all equal carries no signal: its advantages are exactly 0 (never NaN).
    Returns (A (N,), zero_std (N,))."""
    rewards = rewards.double()
    A = torch.zeros_like(rewards)
    zero_std = torch.zeros_like(rewards, dtype=torch.bool)
    if batch_std is None:
        batch_std = float(rewards.std(unbiased=False)) if rewards.numel() > 1 else 0.0
    for g in group_ids.unique():
        m = group_ids == g
        r = rewards[m]
        if bool((r == r[0]).all()):
            zero_std[m] = True  # A stays 0: (r - mean) would be rounding noise divided by eps
            continue
        std = r.std(unbiased=False) if std_mode == "group" else batch_std
        A[m] = (r - r.mean()) / (std + eps)
    # Flow-GRPO clips only the image's advantage (and so does the official code): then the text and the
    # image of one trajectory would be driven by different numbers
    return A.clamp(-adv_clip, adv_clip).float(), zero_std


def sde_step(v: torch.Tensor, x: torch.Tensor, sigma, sigma_next, noise_level: float, second_sigma: float,
             prev_sample: torch.Tensor | None = None, generator: torch.Generator | None = None):
    """One step of the flow sampler as a Gaussian policy (Sec. 3, Flow-GRPO's Euler-Maruyama SDE).

    Samples x_{t-1} when prev_sample is None, else scores the given one; the same code does both, so
    rollout and training log-probs cannot drift apart. v, x: (B, C, h, w); sigma, sigma_next: floats or
    (B,) with sigma = t and dt = sigma_next - sigma < 0; second_sigma is the schedule's second sigma.
    Returns (x_{t-1}, log_prob (B,) or None when std is 0, mean, std_t), all in float32 (bf16 overflows).

    The log-prob is averaged over latent elements (Flow-GRPO, official code), so exp(logp - logp_old) is
    the per-element geometric mean of the density ratio, and the image clip range is tiny (1e-4)."""
    v, x = v.float(), x.float()
    shape = (-1,) + (1,) * (x.ndim - 1)
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(shape)
    sigma_next = torch.as_tensor(sigma_next, dtype=torch.float32, device=x.device).reshape(shape)
    dt = sigma_next - sigma
    # std_t = a * sqrt(t / (1 - t)); at the first step the denominator's t becomes second_sigma: at t = 1
    # (klein, SD3) 1 - t would be 0, and at Cosmos3's first t = 1 - 1e-6 std_t would be 1000 a, pure noise
    t_denominator = torch.minimum(sigma, torch.full_like(sigma, second_sigma))
    std_t = noise_level * torch.sqrt(sigma / (1 - t_denominator))
    # mu = x + v dt + std_t^2 / (2t) * (x + (1 - t) v) dt: the Euler step plus the score correction
    # that keeps the SDE's marginals equal to the ODE's. With std_t = 0 it is exactly the Euler step.
    mean = x + v * dt + std_t**2 / (2 * sigma) * (x + (1 - sigma) * v) * dt
    scale = std_t * torch.sqrt(-dt)  # the step's standard deviation, std_t * sqrt(|dt|)
    if prev_sample is None:
        if noise_level == 0:
            return mean, None, mean, std_t
        noise = torch.randn(x.shape, generator=generator, dtype=torch.float32,
                            device=generator.device if generator is not None else x.device).to(x.device)
        prev_sample = mean + scale * noise
    elif bool((scale == 0).any()):
        raise ValueError("sde_step: cannot score a sample under a zero std (noise_level 0 or dt 0 is an ODE "
                         "step, which has no density); score only the SDE window's steps")
    prev_sample = prev_sample.float()
    # log N(x_{t-1}; mu, scale^2), averaged over all but the batch dimension
    log_prob = (-((prev_sample.detach() - mean) ** 2) / (2 * scale**2) - torch.log(scale)
                - 0.5 * math.log(2 * math.pi))
    return prev_sample, log_prob.mean(dim=tuple(range(1, x.ndim))), mean, std_t


def image_kl(mean: torch.Tensor, mean_ref: torch.Tensor, std_t: torch.Tensor, dt,
             flow_grpo_form: bool = False):
    """Closed-form KL(pi_theta || pi_ref) of one SDE step, averaged per latent element to match the log-prob:
    KL = mean((mu_theta - mu_ref)^2) / (2 std_t^2 |dt|) (Sec. 3, "weighted distance between velocity fields").
    Flow-GRPO and the official code drop |dt|, so their beta equals ours divided by |dt|
    (ours = theirs * |dt|); flow_grpo_form=True gives their expression. Returns (B,)."""
    dims = tuple(range(1, mean.ndim))
    var = std_t.reshape(-1) ** 2 * (1.0 if flow_grpo_form else abs(float(dt)))
    return ((mean - mean_ref) ** 2).mean(dim=dims) / (2 * var)


def text_loss(logp, old_logp, ref_logp, A, mask, clip_low: float, clip_high: float, beta: float = 0.0,
              seq_level: bool = False):
    """GRPO text loss (Sec. 3, Eq. of L_text): PPO clip with separate ranges, k3 KL to the reference.

    logp, old_logp, ref_logp: (G, L) per-token log-probs (ref_logp may be None when beta is 0); A: (G,)
    one advantage per sequence; mask: (G, L) 1 on generated tokens. The loss is the token-level masked mean
    over the batch. seq_level=True uses one ratio per sequence (GSPO), exp(mean_tokens(logp - old_logp)).
    Returns (loss, clipfrac, kl)."""
    mask = mask.float()
    n_tok = mask.sum().clamp(min=1)
    log_ratio = logp - old_logp
    if seq_level:  # GSPO: one ratio per sequence, shared by its tokens
        log_ratio = ((log_ratio * mask).sum(1) / mask.sum(1).clamp(min=1))[:, None].expand_as(logp)
    r = torch.exp(log_ratio)  # (G, L)
    A = A[:, None]  # (G, 1): each sequence keeps its own advantage (never (G,) against (G, 1) -> GxG)
    per_token = -torch.min(r * A, r.clamp(1 - clip_low, 1 + clip_high) * A)  # (G, L)
    # clipped = tokens whose gradient the clip removed
    clipped = ((r < 1 - clip_low) & (A < 0)) | ((r > 1 + clip_high) & (A > 0))
    clipfrac = (clipped.float() * mask).sum() / n_tok
    kl = torch.zeros((), device=logp.device)
    if ref_logp is not None:
        d = ref_logp - logp
        kl = ((torch.exp(d) - d - 1) * mask).sum() / n_tok  # k3 estimator of KL(pi_theta || pi_ref)
    loss = (per_token * mask).sum() / n_tok + beta * kl
    return loss, clipfrac.detach(), kl.detach()


def image_loss(logp, old_logp, A, clip: float, kl=None, beta: float = 0.0):
    """Flow-GRPO image loss (Sec. 3, Eq. of L_img): the density ratio of each trained step, clipped.

    logp, old_logp: (G, W) element-averaged log-probs of the W trained steps; A: (G,), the same advantages
    as the text's (already clipped where they are assigned); kl: (G, W) or None.
    Mean over trained steps and samples (the paper sums the steps: lambda carries that factor).
    Returns (loss, clipfrac)."""
    A = A[:, None]  # (G, 1)
    r = torch.exp(logp - old_logp)  # (G, W)
    per_step = torch.max(-A * r, -A * r.clamp(1 - clip, 1 + clip))
    clipped = ((r < 1 - clip) & (A < 0)) | ((r > 1 + clip) & (A > 0))
    loss = per_step.mean() + (beta * kl.mean() if kl is not None and beta else 0.0)
    return loss, clipped.float().mean().detach()


# --------------------------------------------------------------------------------------------------
# Sec. 4.1: False-Positive Rectification
# --------------------------------------------------------------------------------------------------


def false_positive_rectification(refined: torch.Tensor, init_reward: float, value: str = "init"):
    """FPR (Sec. 4.1): a refinement must strictly improve on the initial image. Before normalization,
    each refinement with R(refined) <= R(x_init) (ties fail) gets the group minimum: the initial image's
    reward (value='init', official code; it is then the minimum) or the lowest refined reward
    (value='group-min', the paper's wording). So a failed refinement never gets a positive advantage, and a
    group where every refinement failed ends with equal rewards: advantage 0, yet it stays in the loss and
    its denominator, as in the official code (`skip_unimproved_step` drops a step's SRR share only when no
    refinement of the whole step improved).

    refined: (G,). Returns (rectified rewards (G,), failed (G,) bool)."""
    failed = refined <= init_reward
    floor = init_reward if value == "init" else float(refined.min())
    return torch.where(failed, torch.full_like(refined, floor), refined), failed


# --------------------------------------------------------------------------------------------------
# Arguments, presets and the reasoner's instructions
# --------------------------------------------------------------------------------------------------


@dataclass
class Args:
    preset: str = "toy"
    """'toy' (the toy world: tiny models with a cached prior, CPU), 'klein' (Qwen3-VL + FLUX.2 klein,
    recommended), 'sd35' (Qwen3-VL + Stable Diffusion 3.5 medium, comparable with Flow-GRPO), 'cosmos3' (the
    unified Cosmos3-Nano) or 'cosmos3-edge' (the unified Cosmos3-Edge, one 24-48 GB GPU); values: PRESETS."""
    policy: str = "decoupled"
    """'unified': one network reasons and draws (Cosmos3: the reasoner's language model is the generator's
    understanding stream, as BAGEL in the paper); 'decoupled': a reasoner (Qwen3-VL) and a separate renderer
    (FLUX.2 klein or SD3.5). Picks the toy world's models; a real preset's checkpoint says which it is."""
    task: str = "rt2i"
    """'rt2i' reasoning text-to-image, 'srr' self-reflective refinement, 'mix' both (Sec. 4.1)."""
    steps: int = 80
    """Training steps; each = rollouts of `groups_per_step` groups, then `updates_per_rollout` updates."""
    out: str = ""
    """Output folder for metrics.jsonl, args.json and sample grids; default runs/<preset>-<task>-<time>."""
    seed: int = 0
    """Seed for the models' LoRA init, the prompt order and every sampling noise."""
    device: str = "auto"
    """'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ..."""
    dtype: str = "float32"
    """Weights' dtype: 'float32' or 'bfloat16'. LoRA weights and all log-prob math stay in float32."""
    reward_url: str = ""
    """Comma-separated reward server URLs. Empty with the toy preset: start the toy server locally."""
    reward_token: str = ""
    """Bearer token for the reward server (default: $ALPHAGRPO_REWARD_TOKEN)."""
    reward_patience: float = 300.0
    """Seconds to keep retrying a reward server that is down (it may be restarting) before the run stops."""
    reasoner: str = ""
    """Reasoner path or hub id (a Qwen-VL instruct model). Toy: the toy world's (--toy-cache)."""
    renderer: str = ""
    """Renderer path or hub id: a Flux2KleinPipeline, StableDiffusion3Pipeline or Cosmos3OmniPipeline folder
    (its model_index.json names the class). Toy: the toy world's."""
    toy_cache: str = ""
    """Where the toy world is built once, in toy-<hash>; default $XDG_CACHE_HOME/alphagrpo or ~/.cache/..."""
    prompts: str = ""
    """prompts.jsonl with DVReward questions (see README). Toy: the toy world's (TOY_WORLD_PROMPTS)."""
    group_size: int = 16
    """G, trajectories per prompt; one group is one rollout batch (same prompt, so no padding)."""
    groups_per_step: int = 4
    """Groups rolled out per training step."""
    updates_per_rollout: int = 2
    """Optimizer updates per step, each on a disjoint share of the groups; 2 (Flow-GRPO): the second is
    off-policy, which is where the clip acts."""
    resolution: int = 32
    """Image side in pixels."""
    num_steps: int = 4
    """T, sampling steps of the rollout sampler."""
    eval_num_steps: int = 4
    """Steps of the deterministic ODE sampler at inference (`sample`, `eval`, the evaluations in training)."""
    sde_window: int = 2
    """W, consecutive steps sampled by the SDE and trained; all other steps are ODE (official code)."""
    sde_window_start_max: int = 0
    """The window starts at a uniformly drawn step in [0, this]; the last step is never trained."""
    noise_level: float = 0.7
    """a in std_t = a * sqrt(t / (1 - t)) (Flow-GRPO); 0 gives the deterministic Euler ODE."""
    guidance_scale: float = 1.0
    """Classifier-free guidance scale, identical at rollout and train time. Toy: 1, no guidance (README: at 2
    and 3 its prior draws what a plan says less often)."""
    max_new_tokens: int = 3
    """Longest reasoning text, in tokens (toy: a plan is 2 words and EOS)."""
    max_text_tokens: int = 32
    """Text-encoder tokens for prompt + reasoning (klein: Qwen3; SD3: T5, while CLIP keeps its first 77)."""
    temperature: float = 1.0
    """Sampling temperature of the reasoning text (no top-p/top-k: they make stored log-probs off-policy)."""
    text_clip_low: float = 0.2
    """Text ratio clip: r in [1 - low, 1 + high] (clip-higher)."""
    text_clip_high: float = 0.28
    """Upper text clip range."""
    image_clip: float = 1e-2
    """Image ratio clip; tiny because the log-prob is a per-element mean (Flow-GRPO: 1e-4 at 64x64x16
    latents; the toy's 4x4x16 latents average 256x fewer elements, so its ratios move ~16x more)."""
    adv_clip: float = 5.0
    """|A| <= adv_clip, clipped where the advantages are assigned, so a trajectory's text and image share one
    number (Flow-GRPO and the official code clip the image's alone). It fires only with the batch std (a
    group's own keeps |A| <= sqrt(G - 1)); where it does, a group's advantages no longer sum to 0."""
    beta_text: float = 0.0
    """beta_text, weight of the k3 KL to the reference (LoRA off) on the text."""
    beta_image: float = 0.0
    """beta_img, weight of the closed-form image KL (ours carries 1/|dt|: ours = Flow-GRPO's * |dt|)."""
    kl_flow_grpo_form: bool = False
    """Use Flow-GRPO's image KL, mean((mu - mu_ref)^2) / (2 std_t^2), without the 1/|dt|."""
    lam: float = 1.0
    """lambda in L = L_text + lambda * L_img for RT2I groups; our L_img is the mean over the W trained steps
    where the paper sums them (official: 1 / text_loss_weight, 1 in its RT2I configs)."""
    lam_srr: float = 0.0
    """lambda for SRR groups; 0: W, the group's number of trained steps, so that lambda * L_img is the sum
    over the steps, as the paper writes it and as the official SRR configs weigh it (weight 1 / K)."""
    seq_level_ratio: bool = False
    """Sequence-level (GSPO) text ratio instead of per-token."""
    std_mode: str = "batch"
    """Advantage std: 'group' (per group) or 'batch' (all groups of the step: the official code's and
    Flow-GRPO's configs, global_std=True). Either way the mean is the group's."""
    lr: float = 1e-5
    """AdamW learning rate of the renderer's LoRA (official: 5e-5 at rank 32). Toy: at 1e-4 the renderer's
    images drift off the prior's within 80 steps (measured), at 1e-5 they hold."""
    reasoner_lr: float = 1e-3
    """Learning rate of the reasoner's LoRA; 0: --lr. The official code trains both halves of BAGEL at one
    rate (und_learning_rate None), as the cosmos3 preset does; the toy's reasoner wants its own (1e-3 learns,
    1e-2 collapses), and the unified toy 3e-4, as its LoRA also moves the context the generator reads."""
    train_reasoner: bool = True
    """Update the reasoner's LoRA. --no-train-reasoner freezes it: the renderer alone learns from the shared
    advantage (the text loss is still computed, for the metrics)."""
    train_renderer: bool = True
    """Update the renderer's LoRA. --no-train-renderer freezes it: the reasoner alone learns."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Clip the global grad norm of all LoRA weights."""
    lora_rank: int = 8
    """LoRA rank r, both models."""
    lora_alpha: float = 64.0
    """LoRA alpha; the update is scaled by alpha / r."""
    reasoner_lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    """Reasoner Linear layers that get LoRA (suffixes of module names, or patterns with '*'): language model
    only (Cosmos3-Edge: EDGE_REASONER_LORA_TARGETS, as its vision tower's layers have the same names)."""
    renderer_lora_targets: str = ""
    """Renderer Linear layers that get LoRA; empty: the renderer's own list (SD3: the joint-attention
    projections, as Flow-GRPO; klein: attention and MLP projections, as Flow-Factory)."""
    context_grad: bool = False
    """Unified policy: the image loss also trains the shared stream, through the context recomputed with
    gradient. Off: as the official code trains BAGEL, the context is cached at rollout without gradient."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (needed at real sizes)."""
    same_init_noise: bool = False
    """All G trajectories of a group start from one x_T (official init_same_noise): reward differences then
    come from the policy's choices alone (text and SDE noise)."""
    sample_every: int = 20
    """Write a PNG grid of the step's samples every this many steps (0: never)."""
    eval_every: int = 20
    """Evaluate on the test prompts (ODE sampler, fixed seeds) every this many steps (0: never)."""
    save_every: int = 40
    """Checkpoint (LoRA, optimizer, step; LoRA exported for diffusers and PEFT) every this many steps."""
    resume: str = ""
    """Continue a run from a checkpoint folder, or from the newest checkpoint of a run folder."""
    dry_run: bool = False
    """Build the preset's models at their real shapes from the embedded configs (no download), print the
    parameter counts and the memory plan; on a GPU, with random weights, also run one full training step."""

    # Self-Reflective Refinement (Sec. 4.1)
    srr_init: str = "rt2i"
    """--task mix's initial images. 'rt2i' (official): SRR group k refines the lowest-rewarded image of the
    step's RT2I group k + n_srr, which drew the same prompt with a plan, as at inference. 'candidates': as
    --task srr always does (official), K = --srr-candidates images drawn from the prompt alone."""
    srr_candidates: int = 2
    """K initial images rendered per SRR prompt (ODE, no reasoning) where SRR draws its own; the worst is kept."""
    srr_init_steps: int = 0
    """Steps of the ODE sampler that draws SRR's candidate initial images; 0: --num-steps, the refinements'
    count (the official code draws both at its SRR count, 40). A stronger sampler for the initial images than
    for the refinements makes FPR fail refinements that are as good, biasing improved_frac down."""
    reflection: str = "reflect"
    """The reflection's instruction (Sec. 2, the pilot study): 'reflect' tells the reasoner that the image
    has mistakes and asks it to find them (the paper's choice); 'verify' asks whether the image matches the
    request and to fix only what does not (what the pilot found prone to confirmation bias). Training and
    refinement."""
    srr_pick: str = "min"
    """'min': keep the lowest-reward initial image (official); 'sample': draw one, favouring low rewards."""
    srr_refine: str = "auto"
    """How the SRR refinement sees the initial image: 'edit' (in context: its latent tokens join the sequence
    and the refinement starts from fresh noise, as the paper's unified model; klein), 'sdedit' (the sampler
    starts from the noised initial latents; any renderer) or 'auto' (edit where the renderer can)."""
    srr_strength: float = 0.75
    """SDEdit strength of the refinement: the share of the schedule re-run from the noised initial image."""
    fpr: bool = True
    """False-Positive Rectification: refinements that do not beat the initial image get the minimum."""
    fpr_value: str = "init"
    """'init': the initial image's reward (official); 'group-min': the group's lowest refined reward."""
    mix_ratio: float = 0.5
    """With --task mix, the share of groups that are SRR."""


# The reasoner's instructions: one visible constant per task (Sec. 4.1).
RT2I_INSTRUCTION = (
    "You will draw an image for this request: \"{prompt}\". Before drawing, plan it: list the objects "
    "and how many, their colours and other attributes, where each one is, the setting, the style, and "
    "anything the request implies but does not say. Answer with the plan only, as short visual facts."
)


# Reflect mode (Sec. 2): tell the model that the image *is* wrong and make it look for errors; asking
# "is this image correct?" triggers confirmation bias instead.
REFLECT_INSTRUCTION = (
    "This image was generated for the request: \"{prompt}\". It contains mistakes. Compare it with the "
    "request detail by detail (objects, counts, colours, positions, text, style, visual defects) and find "
    "what is wrong. Then write 'Diagnosis:' followed by the errors, and 'Fix:' followed by an imperative "
    "instruction that corrects them."
)
# Verify mode, the pilot study's other arm (--reflection verify): the image may be right
VERIFY_INSTRUCTION = (
    "This image was generated for the request: \"{prompt}\". Check whether it matches the request detail by "
    "detail (objects, counts, colours, positions, text, style, visual defects). If it does, say so. If it "
    "does not, write 'Diagnosis:' followed by what does not match, and 'Fix:' followed by an imperative "
    "instruction that redraws only that."
)
REFLECTION = {"reflect": REFLECT_INSTRUCTION, "verify": VERIFY_INSTRUCTION}


# --------------------------------------------------------------------------------------------------
# The models: a hand-written LoRA, the reasoner (transformers), the renderer (diffusers), one network
# --------------------------------------------------------------------------------------------------


class LoRALinear(nn.Module):
    """y = W x + (alpha / r) * B A x, with W frozen. A, B in float32 whatever the base dtype.
    Key names (`lora_A.weight`, `lora_B.weight`) match PEFT's, which makes the export a renaming."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.enabled = True
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device,
                                dtype=torch.float32)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device,
                                dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's init: A random, B zero,
        nn.init.zeros_(self.lora_B.weight)  # so training starts exactly at the base model

    def forward(self, x):
        y = self.base(x)
        if not self.enabled:
            return y
        return y + (self.lora_B(self.lora_A(x.to(torch.float32))) * self.scale).to(y.dtype)


def add_lora(model: nn.Module, targets: str, rank: int, alpha: float) -> list[nn.Parameter]:
    """Freeze `model`'s weights and wrap every nn.Linear whose name ends with one of the comma-separated
    targets (a target with '*' is a pattern for the name's end: 'language_model.*.fc1' spares a vision
    tower's fc1). A LoRA already in it (the unified policy's shared one, the reasoner's) stays trainable."""
    for n, p in model.named_parameters():
        p.requires_grad_(".lora_" in n)
    suffixes = tuple(t.strip() for t in targets.split(",") if t.strip())
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and any(
        fnmatch.fnmatchcase(n, "*" + s) if "*" in s else n == s or n.endswith("." + s) for s in suffixes)]
    if not names:
        raise ValueError(f"no nn.Linear in {type(model).__name__} matches the LoRA targets {targets!r}")
    params = []
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        lora = LoRALinear(getattr(parent, child), rank, alpha)
        setattr(parent, child, lora)
        params += [lora.lora_A.weight, lora.lora_B.weight]
    return params


@contextlib.contextmanager
def lora_disabled(*models: nn.Module):
    """The reference policy pi_ref is the same model with LoRA switched off (no second copy)."""
    layers = [m for model in models for m in model.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.enabled = False
    try:
        yield
    finally:
        for m in layers:
            m.enabled = True


@dataclass
class TextRollout:
    """G reasoning texts for one prompt (one group): everything the text loss needs, on the device."""
    inputs: dict  # processor outputs for the prompt (+ image), batch G, no padding (same prompt)
    ids: torch.Tensor  # (G, L) generated tokens, padded after the first EOS
    mask: torch.Tensor  # (G, L) 1 on generated tokens up to and including the first EOS
    texts: list[str]
    old_logp: torch.Tensor | None = None  # (G, L) log-probs at rollout time
    ref_logp: torch.Tensor | None = None  # (G, L) log-probs of pi_ref (only when beta_text > 0)


class Reasoner:
    """pi_text: a Qwen-VL instruct model from transformers. It writes the plan (RT2I) or looks at an image
    and writes the diagnosis and fix (SRR). Interface: generate() and token_logprobs()."""

    def __init__(self, processor, model, device, args: Args):
        from transformers import GenerationConfig

        self.processor = processor
        self.model = model.to(device).eval()
        cfg = self.model.generation_config
        # The shipped generation_config holds top_p/top_k/temperature defaults; sampling with them while
        # scoring with the plain softmax would make the stored log-probs off-policy. Keep only the ids.
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else processor.tokenizer.pad_token_id
        self.model.generation_config = GenerationConfig(eos_token_id=cfg.eos_token_id, pad_token_id=pad)
        eos = cfg.eos_token_id
        self.eos_ids = torch.tensor(eos if isinstance(eos, list) else [eos], device=device)
        # Image/video placeholder tokens must never be generated (a stray one breaks the next forward pass).
        # They are masked identically when sampling and when scoring, so the log-probs stay on-policy.
        c = self.model.config
        self.banned = [i for i in (c.image_token_id, c.video_token_id, c.vision_start_token_id,
                                   c.vision_end_token_id) if i is not None]
        self.lora_params = add_lora(self.model, args.reasoner_lora_targets, args.lora_rank, args.lora_alpha)
        self.checkpointing = args.gradient_checkpointing
        if self.checkpointing:
            no_reentrant = {"use_reentrant": False}
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=no_reentrant)
        self.device = device
        self.temperature = args.temperature
        self.max_new_tokens = args.max_new_tokens

    def chat_inputs(self, instruction: str, image: Image.Image | None, n: int) -> dict:
        """The chat-templated prompt, repeated n times (image before the text in the user turn)."""
        content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": instruction}]
        messages = [{"role": "user", "content": content}]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # mm_token_type_ids: the image tokens' 3-D rotary positions (Qwen3-VL's processor returns them unasked,
        # Cosmos3-Edge's only when asked)
        kwargs = {"images": [image] * n, "return_mm_token_type_ids": True} if image is not None else {}
        inputs = self.processor(text=[text] * n, return_tensors="pt", **kwargs)
        return {k: v.to(self.device) for k, v in inputs.items()}

    @torch.no_grad()
    def generate(self, instruction: str, image: Image.Image | None, n: int) -> TextRollout:
        """Sample n texts y ~ pi_text(. | c) with plain temperature sampling."""
        inputs = self.chat_inputs(instruction, image, n)
        P = inputs["input_ids"].shape[1]
        # eval mode keeps the KV cache on (transformers drops it when checkpointing in training)
        self.model.eval()
        out = self.model.generate(**inputs, do_sample=True, temperature=self.temperature, top_p=1.0, top_k=0,
                                  max_new_tokens=self.max_new_tokens, suppress_tokens=self.banned)
        ids = out[:, P:]  # (G, L)
        is_eos = torch.isin(ids, self.eos_ids)
        # 1 up to and including the first EOS: cumsum of EOS before this position must be 0
        mask = ((is_eos.cumsum(1) - is_eos.long()) == 0).long()
        ids = ids.masked_fill(mask == 0, self.model.generation_config.pad_token_id)
        texts = self.processor.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return TextRollout(inputs=inputs, ids=ids, mask=mask, texts=[t.strip() for t in texts])

    def token_logprobs(self, rollout: TextRollout) -> torch.Tensor:
        """log pi_text(y_k | c, y_<k) for every generated token, teacher-forced: (G, L). The rollout stores
        exactly this function's output, so the first update's ratio is 1 up to nothing."""
        inp = rollout.inputs
        L = rollout.ids.shape[1]
        # transformers checkpoints activations only in training mode; Qwen-VL has no dropout, so the mode
        # changes nothing else and the rollout's (no-grad, eval) log-probs stay equal to these
        self.model.train(self.checkpointing and torch.is_grad_enabled())
        extra = ("input_ids", "attention_mask", "mm_token_type_ids")  # passed below, extended by y
        kwargs = {k: v for k, v in inp.items() if k not in extra}
        # the generated tokens are text (type 0) for Qwen-VL's 3-D rotary positions
        if "mm_token_type_ids" in inp:
            text_types = torch.zeros_like(rollout.ids)
            kwargs["mm_token_type_ids"] = torch.cat([inp["mm_token_type_ids"], text_types], 1)
        logits = self.model(input_ids=torch.cat([inp["input_ids"], rollout.ids], 1),
                            attention_mask=torch.cat([inp["attention_mask"], rollout.mask], 1),
                            logits_to_keep=L + 1, use_cache=False, **kwargs).logits[:, :-1]  # (G, L, V)
        logits = logits.float() / self.temperature
        logits[..., self.banned] = float("-inf")  # exactly what suppress_tokens does when sampling
        return logits.log_softmax(-1).gather(-1, rollout.ids[..., None]).squeeze(-1)


@dataclass
class ImageRollout:
    """G denoising paths for one group: the SDE window's latents and log-probs, and the images."""
    cond: tuple  # Renderer.encode's output, which the loss reads too (Cosmos3: the cached context)
    latents: torch.Tensor  # (G, W+1, C, h, w): x at the W trained steps and the one after the last
    sigmas: torch.Tensor  # (W+1,) the sigmas of those latents
    second_sigma: float  # the schedule's second sigma (sde_step's guard at t = 1)
    old_logp: torch.Tensor  # (G, W)
    images: list  # G PIL images


class Renderer:
    """pi_img: a diffusers flow-matching model driven by our own sampler. The interface the algorithm uses:
    noise(), sigmas(), encode() (text, a reference image where the model can edit, and the image's size where
    the conditioning depends on it), fresh(), velocity(), decode(), encode_image(). Latents x are (B, C, h, w)
    in the space the sampler steps in; one latent cell is `scale` pixels a side. Images are --resolution
    squares, except an edit, drawn at its source's aspect ratio (`edit_size`). Three models fill it:
    CosmosRenderer below (the unified policy: the reasoner's own network draws), and the decoupled policy's
    KleinRenderer (FLUX.2 klein) and SD3Renderer (SD3.5) in the appendix."""

    can_edit = False  # True where the reference image can join the context (SRR refined in context)
    distilled = False  # True for step-distilled models, which take no guidance

    def __init__(self, pipe, device, args: Args):
        self.pipe = pipe.to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.transformer = self.pipe.transformer.eval()
        self.vae = self.pipe.vae
        self.scheduler = self.pipe.scheduler
        targets = args.renderer_lora_targets or self.lora_targets
        self.lora_params = add_lora(self.transformer, targets, args.lora_rank, args.lora_alpha)
        for m in self.pipe.components.values():
            if isinstance(m, nn.Module) and m is not self.transformer:
                m.requires_grad_(False)
        if args.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        self.device = device
        self.dtype = self.transformer.dtype
        self.args = args

    def latent_hw(self, size: tuple | None = None) -> tuple[int, int]:
        """(h, w) of the latents of an image of size (H, W) pixels; None: the --resolution square."""
        H, W = size or (self.args.resolution, self.args.resolution)
        return H // self.scale, W // self.scale

    def edit_size(self, image: Image.Image) -> tuple[int, int]:
        """(H, W) of an edit of `image`: its aspect ratio at about --resolution^2 pixels, in whole latent
        patches (multiples of 16), so a scorer that resizes the edit to its source does not stretch it."""
        res = self.args.resolution
        k = math.sqrt(res * res / (image.width * image.height))
        m = self.multiple
        return tuple(max(m, round(side * k / m) * m) for side in (image.height, image.width))

    def noise(self, n: int, generator: torch.Generator, size: tuple | None = None) -> torch.Tensor:
        """x_T ~ N(0, I), (n, C, h, w) for images of `size` (H, W) pixels (None: the --resolution square),
        drawn on the CPU so that every device gets the same samples."""
        shape = (n, self.latent_channels, *self.latent_hw(size))
        return torch.randn(shape, generator=generator).to(self.device)

    def guided(self, guidance: float | None) -> bool:
        """Whether classifier-free guidance runs: as the pipelines decide it, only at a scale above 1 on a
        model that takes guidance. At 1 (or below) the transformer sees the conditional batch alone."""
        g = self.args.guidance_scale if guidance is None else guidance
        return g > 1 and not self.distilled

    def cfg(self, v: torch.Tensor, guidance: float | None) -> torch.Tensor:
        """Classifier-free guidance over a [unconditional; conditional] batch, in float32."""
        v_uncond, v_cond = v.float().chunk(2)
        g = self.args.guidance_scale if guidance is None else guidance
        return v_uncond + g * (v_cond - v_uncond)

    def fresh(self, cond: tuple, grad: bool = False) -> tuple:
        """encode()'s output recomputed with the current weights: the same here (the text encoders are
        frozen); Cosmos3's context is the shared stream's, which the text loss trains."""
        return cond

    def pixels(self, image: Image.Image, size: tuple, resize_mode: str = "default") -> torch.Tensor:
        """PIL image -> (1, 3, H, W) in [-1, 1] at size (H, W), through the pipeline's own image processor."""
        processor = getattr(self.pipe, "image_processor", None) or self.pipe.video_processor  # Cosmos3: video
        pixels = processor.preprocess(image.convert("RGB"), height=size[0], width=size[1],
                                      resize_mode=resize_mode)
        return pixels.to(self.device)

    def to_pil(self, img: torch.Tensor) -> list:
        """(B, 3, H, W) in [-1, 1] -> B PIL images."""
        img = ((img.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        return [Image.fromarray(a) for a in img.permute(0, 2, 3, 1).cpu().numpy()]


@dataclass
class CosmosContext:
    """What Cosmos3's generation tokens read of their context, for a batch of B samples (B = G, or 2G with
    CFG: [negative; positive]). Understanding tokens attend only to understanding tokens, so their keys and
    values do not depend on x_t or t: they are computed once per sample (`CosmosRenderer.encode`) and read at
    every denoising step, as BAGEL's cache in the official code and Cosmos3's serving engines keep them."""
    k: torch.Tensor  # (layers, B, Lc, Hkv, D) keys as the generation tokens read them (after norm_k, rotary)
    v: torch.Tensor  # (layers, B, Lc, Hkv, D) values
    mask: torch.Tensor  # (B, Lc) True on the sample's own tokens (contexts are right-padded to the longest)
    positions: torch.Tensor  # (3, B, N) rotary positions of the generation tokens: [reference,] noisy image
    hw: tuple  # (h, w) of the noisy latents those positions are for
    cfg: bool  # whether it holds [negative; positive] (B = 2G) or the positive branch alone (B = G)

    def positive(self) -> CosmosContext:
        """The positive branch alone, for a call without CFG."""
        n = len(self.mask) // 2 if self.cfg else len(self.mask)
        return CosmosContext(self.k[:, -n:], self.v[:, -n:], self.mask[-n:], self.positions[:, -n:], self.hw,
                             False)


class ContextAttention:
    """Cosmos3's attention processor, set on every layer by CosmosRenderer. Called as the stock model calls
    it (four rotary tables, one packed sample) it is diffusers' own Cosmos3AttnProcessor. Called with (cos,
    sin, CosmosContext) it runs the generation pathway alone for a batch (B, N, hidden): each sample's queries
    attend to [its own cached context; its own generation tokens], as the stock pathway on one sample."""

    def __init__(self, layer: int):
        from diffusers.models.transformers.transformer_cosmos3 import Cosmos3AttnProcessor
        self.layer = layer
        self.stock = Cosmos3AttnProcessor()

    def __call__(self, attn, und_seq: torch.Tensor, gen_seq: torch.Tensor, rotary_emb: tuple):
        from diffusers.models.transformers.transformer_cosmos3 import _rotate_half
        if len(rotary_emb) == 4:
            return self.stock(attn, und_seq, gen_seq, rotary_emb)
        cos, sin, context = rotary_emb  # (B, N, D), (B, N, D), the cache
        B, N, _ = gen_seq.shape
        H, Hkv, D = attn.num_attention_heads, attn.num_key_value_heads, attn.head_dim
        q = attn.norm_added_q(attn.add_q_proj(gen_seq).view(B, N, H, D))
        k = attn.norm_added_k(attn.add_k_proj(gen_seq).view(B, N, Hkv, D))
        v = attn.add_v_proj(gen_seq).view(B, N, Hkv, D)
        cos, sin = cos[:, :, None], sin[:, :, None]
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        k = torch.cat([context.k[self.layer], k], 1)  # (B, Lc + N, Hkv, D)
        v = torch.cat([context.v[self.layer], v], 1)
        mask = torch.cat([context.mask, context.mask.new_ones(B, N)], 1)[:, None, None]  # (B, 1, 1, Lc + N)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, tokens, D)
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return und_seq, attn.to_add_out(out.transpose(1, 2).reshape(B, N, H * D))


class CosmosRenderer(Renderer):
    """The unified policy's image half: Cosmos3 (`Cosmos3OmniPipeline`), a BAGEL-style mixture of
    transformers. Understanding tokens (the chat-templated prompt and reasoning) run through the Qwen3-VL
    language model, causally; generation tokens (2x2 patches of Wan VAE latents) run through their own
    projections and MLP and attend to all of it, predicting the velocity noise - x_0. The understanding stream
    is the reasoner's own (`share_understanding_stream`): one network reasons and draws.

    As the official code trains BAGEL ("Ignore context grad. Save the cache."), the context is computed once
    per sample without gradient (`encode`); every denoising step and every trained step of the loss reads it
    (--context-grad: recomputed with gradient for the loss). Each step is one call of the generation stream
    for the whole group and its CFG branch. x: (B, C, h, w), the pipeline's normalized latents. A reference
    image (SRR's initial image) joins the generation tokens as a clean vision item before the noisy one (no
    timestep embedding, not predicted; the layout is ours, README): generation attention is bidirectional,
    so it is not cacheable context."""

    can_edit = True
    # the generation stream's attention and MLP (the understanding stream's LoRA is the reasoner's)
    lora_targets = ("add_q_proj,add_k_proj,add_v_proj,to_add_out,mlp_moe_gen.gate_proj,mlp_moe_gen.up_proj,"
                    "mlp_moe_gen.down_proj")

    def __init__(self, pipe, device, args: Args, reasoner_model: nn.Module):
        share_understanding_stream(pipe.transformer, reasoner_model)
        super().__init__(pipe, device, args)
        c = self.transformer.config
        self.scale = self.pipe.vae_scale_factor_spatial  # pixels per latent cell
        self.patch = c.latent_patch_size
        self.multiple = self.scale * self.patch  # pixels per token
        self.latent_channels = c.latent_channel
        self.mean = torch.tensor(self.vae.config.latents_mean).view(1, -1, 1, 1).float().to(device)
        self.std = torch.tensor(self.vae.config.latents_std).view(1, -1, 1, 1).float().to(device)
        self.timestep = {}  # sigma -> the scheduler's integer timestep
        self.transformer.set_attn_processor({name: ContextAttention(int(name.split(".")[1]))
                                             for name in self.transformer.attn_processors})

    def guided(self, guidance: float | None) -> bool:
        """Cosmos3OmniPipeline guides at any scale other than 1."""
        return (self.args.guidance_scale if guidance is None else guidance) != 1

    def sigmas(self, num_steps: int, size: tuple | None = None) -> torch.Tensor:
        """The pipeline's schedule (UniPC's flow sigmas, shifted; the same at every size), and its timesteps
        floor(1000 sigma), which the transformer is called with."""
        if self.pipe.config.use_native_flow_schedule:
            import numpy as np
            n = self.scheduler.config.num_train_timesteps
            self.scheduler.set_timesteps(num_steps, sigmas=np.linspace(1 - 1 / n, 0, num_steps + 1)[:-1])
        else:
            self.scheduler.set_timesteps(num_steps, device="cpu")
        sigmas = self.scheduler.sigmas.float().cpu()
        self.timestep.update(zip(sigmas.tolist(), self.scheduler.timesteps.tolist()))
        return sigmas

    def encode(self, texts: list[str], reference: torch.Tensor | None = None, size: tuple | None = None,
               grad: bool = False) -> tuple:
        """The context of every sample, computed once: each text (and with CFG the negative prompt, once for
        all) is tokenized as the pipeline tokenizes it for an image of `size` (H, W) pixels (None: the
        --resolution square; the chat template says the resolution) and runs through the understanding stream
        alone, whose keys and values at every layer are kept (CosmosContext). Without gradient unless `grad`
        (--context-grad's loss). Returns (texts, reference (1, C, h', w') or None, size, CosmosContext)."""
        res = self.args.resolution
        size = tuple(size or (res, res))
        hw = self.latent_hw(size)
        reference = None if reference is None else reference.detach()
        with torch.set_grad_enabled(grad):
            done = {}  # token ids -> keys, values, positions (the negative prompt's: once for all)
            samples = []
            tokens = [self.pipe.tokenize_prompt(t, None, num_frames=1, height=size[0], width=size[1])
                      for t in texts]  # (positive ids, negative ids) per text
            for negative in (True, False) if self.guided(None) else (False,):
                for pair in tokens:
                    ids = tuple(pair[1 if negative else 0])
                    if ids not in done:
                        done[ids] = self.context_of(ids, hw, reference)
                    samples.append(done[ids])
            Lc = max(s[0].shape[1] for s in samples)
            pad = lambda t: nn.functional.pad(t, (0, 0, 0, 0, 0, Lc - t.shape[1]))  # right-pad tokens to Lc
            k, v = (torch.stack([pad(s[i]) for s in samples], 1) for i in (0, 1))  # (layers, B, Lc, Hkv, D)
        mask = torch.stack([torch.arange(Lc, device=self.device) < s[0].shape[1] for s in samples])
        positions = torch.stack([s[2] for s in samples], 1)  # (3, B, N)
        return list(texts), reference, size, CosmosContext(k, v, mask, positions, hw, self.guided(None))

    def context_of(self, ids: tuple, hw: tuple, reference: torch.Tensor | None):
        """One sample's context from its token ids (`tokenize_prompt`: chat template, resolution sentence,
        EOS, <|vision_start|>), by the pipeline's helpers (3-D rotary positions) and the stock decoder layers:
        the keys (layers, L, Hkv, D) after norm_k [k_norm_und_for_gen] and rotary, as the stock processor's
        generation pathway reads them, the values, and the positions (3, N) of the generation tokens ([the
        clean reference,] the noisy image)."""
        from diffusers.models.transformers.transformer_cosmos3 import _rotate_half
        p, tr, dev = self.pipe, self.transformer, self.device
        seg = p._prepare_text_segment(list(ids), device=dev)
        positions, offset, curr = [], seg["vision_start_temporal_offset"], seg["und_len"]
        items = ([(reference.shape[-2:], True)] if reference is not None else []) + [(hw, False)]
        for item_hw, clean in items:
            vis = p._prepare_vision_segment(torch.zeros(1, 1, 1, *item_hw), clean, offset, None, curr, dev,
                                            condition_frame_indexes=[0] if clean else [])
            positions.append(vis["vision_mrope_ids"])
            offset = math.ceil(vis["vision_mrope_ids"].max().item()) + 1
            curr += vis["num_vision_tokens"]
        h = tr.embed_tokens(seg["input_ids"])  # (L, hidden)
        cos, sin = (t.squeeze(0) for t in tr.rotary_emb(seg["text_mrope_ids"].unsqueeze(1), dev, h.dtype))
        ks, vs = [], []
        for i, layer in enumerate(tr.layers):  # the stock layer computes these inside, returns none of them
            a = layer.self_attn
            x = layer.input_layernorm(h)
            k = a.norm_k(a.to_k(x).view(-1, a.num_key_value_heads, a.head_dim))
            k = a.k_norm_und_for_gen(k) if a.k_norm_und_for_gen is not None else k
            ks.append(k * cos[:, None] + _rotate_half(k) * sin[:, None])
            vs.append(a.to_v(x).view(-1, a.num_key_value_heads, a.head_dim))
            if i < len(tr.layers) - 1:  # the last layer's output is read by no generation token
                h, _ = layer(h, h[:0], (cos, sin, cos[:0], sin[:0]))  # the stock layer, understanding only
        return torch.stack(ks), torch.stack(vs), torch.cat(positions, 1)

    def fresh(self, cond: tuple, grad: bool = False) -> tuple:
        """The same context recomputed with the current weights (and gradient, for --context-grad's loss)."""
        return self.encode(*cond[:3], grad=grad)

    def velocity(self, x: torch.Tensor, sigma: float, cond: tuple,
                 guidance: float | None = None) -> torch.Tensor:
        """v_theta(x_t, t, c [, reference]) with classifier-free guidance, in float32, for the whole batch in
        one call of the generation stream over its tokens alone. x: (B, C, h, w)."""
        _, ref, _, context = cond
        B, C, h, w = x.shape
        tr = self.transformer
        guided = self.guided(guidance)
        if (h, w) != context.hw or len(context.mask) != (2 if context.cfg else 1) * B:
            raise ValueError(f"CosmosRenderer.velocity: latents {tuple(x.shape)} do not match the context, "
                             f"encoded for {len(context.mask)} samples (CFG {context.cfg}) of {context.hw}")
        if guided and not context.cfg:
            raise ValueError("CosmosRenderer.velocity: CFG asked of a context encoded without its negative "
                             "branch (encode runs it where --guidance-scale is not 1)")
        context = context if guided else context.positive()
        n = 2 if guided else 1  # CFG: [negative; positive] in one batch
        items = ([ref.expand(B, -1, -1, -1)] if ref is not None else []) + [x]
        tokens = torch.cat([self.patchify(item.to(self.dtype)) for item in items], 1).repeat(n, 1, 1)
        hidden = tr.proj_in(tokens)  # (nB, N, hidden)
        # the timestep embedding, on the noisy tokens only (the reference is clean)
        t = torch.full((1,), self.timestep.get(float(sigma), int(float(sigma) * 1000)), device=x.device)
        embedder = tr.time_embedder
        temb = embedder(tr.time_proj(t * tr.config.timestep_scale).to(next(embedder.parameters()).dtype))
        Nn = (h // self.patch) * (w // self.patch)  # noisy tokens
        hidden = torch.cat([hidden[:, :-Nn], hidden[:, -Nn:] + temb.to(hidden.dtype)], 1)
        cos, sin = tr.rotary_emb(context.positions, x.device, hidden.dtype)  # (nB, N, D)
        _, out = tr._run_decoder_stack(hidden[:, :0], hidden, (cos, sin, context))  # stock layers, final norm
        v = self.unpatchify(tr.proj_out(out[:, -Nn:]), h, w).float()  # (nB, C, h, w)
        return self.cfg(v, guidance) if guided else v

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, h/p * w/p, p*p*C), the stock `_patchify_and_pack_latents` of one frame."""
        B, C, h, w = x.shape
        p = self.patch
        return torch.einsum("bchpwq->bhwpqc", x.reshape(B, C, h // p, p, w // p, p)).reshape(B, -1, p * p * C)

    def unpatchify(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(B, h/p * w/p, p*p*C) -> (B, C, h, w), the stock `_unpatchify_and_unpack_latents` of one frame."""
        p = self.patch
        x = tokens.reshape(len(tokens), h // p, w // p, p, p, -1)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(len(tokens), -1, h, w)

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> list:
        """Normalized latents (B, C, h, w) -> the VAE's (B, C, 1, h, w) -> pixels (one frame)."""
        z = (x.float() * self.std + self.mean)[:, :, None]
        return self.to_pil(self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0][:, :, 0])

    @torch.no_grad()
    def encode_image(self, image: Image.Image, size: tuple | None = None) -> torch.Tensor:
        """PIL image -> normalized latents (1, C, h, w), the posterior's mode, at `size` (H, W); None: at the
        image's aspect ratio (`edit_size`), as the refinement that sees it is drawn."""
        px = self.pixels(image, size or self.edit_size(image))[:, :, None].to(self.vae.dtype)
        z = self.vae.encode(px).latent_dist.mode()[:, :, 0].float()
        return (z - self.mean) / self.std


@torch.no_grad()
def render(renderer: Renderer, cond: tuple, x: torch.Tensor, sigmas: torch.Tensor, window: range,
           noise_level: float, generator: torch.Generator | None = None, start: int = 0):
    """Run the sampler from x at sigmas[start] to sigmas[-1] = 0: SDE on the step indices in `window`, ODE
    elsewhere. Returns (x_0 (G, C, h, w), window latents (G, W+1, C, h, w), window log-probs (G, W)),
    the last two None for an empty window (pure ODE)."""
    kept = []  # the window's latents
    logps = []
    second_sigma = float(sigmas[1])
    for i in range(start, len(sigmas) - 1):
        a = noise_level if i in window else 0.0
        if i == window.start:
            kept.append(x)
        v = renderer.velocity(x, sigmas[i], cond)
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x, logp, _, _ = sde_step(v, x, sigma, sigma_next, a, second_sigma, generator=generator)
        if i in window:
            kept.append(x)
            logps.append(logp)
    if not len(window):
        return x, None, None
    return x, torch.stack(kept, 1), torch.stack(logps, 1)


@dataclass
class Policy:
    """pi = pi_text x pi_img: the two models of the unified trajectory, with their LoRA weights."""
    reasoner: Reasoner
    renderer: Renderer
    device: torch.device


# --------------------------------------------------------------------------------------------------
# Rollouts: one group = one prompt, G trajectories o_i = (y_i, x_i) (Sec. 4.1)
# --------------------------------------------------------------------------------------------------


def sdedit_start(x_init: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor, strength: float):
    """The SRR refinement is conditioned on the initial image SDEdit-style: the sampler starts from its
    latents noised to the sigma where the last `strength` share of the schedule begins. Flow matching
    noises by interpolation, x_t = (1 - t) x_0 + t eps. Returns (start step index, x_t). Strength 0 gives
    back x_init exactly (no step runs); strength 1 is a fresh sample."""
    start = len(sigmas) - 1 - round(strength * (len(sigmas) - 1))
    t = float(sigmas[start])
    return start, (1 - t) * x_init + t * noise


def refines_in_context(renderer: Renderer, args: Args) -> bool:
    """SRR refines with the initial image in context: --srr-refine edit, or auto where the renderer can."""
    return args.srr_refine == "edit" or (args.srr_refine == "auto" and renderer.can_edit)


def refinement_inputs(renderer: Renderer, args: Args, texts: list, x_init: torch.Tensor, noise: torch.Tensor,
                      sigmas: torch.Tensor):
    """How an SRR refinement is conditioned on the initial image's latents x_init (1, C, h, w); the one place
    that knows, for training and inference. In context (klein): fresh noise, x_init's tokens join the
    sequence, and the model redraws what is wrong (it can remove, move, recount). SDEdit (SD3): the sampler
    starts from x_init noised to --srr-strength. Returns (cond, start step, x at the start)."""
    size = tuple(n * renderer.scale for n in noise.shape[-2:])  # the refinement's (H, W) in pixels
    if refines_in_context(renderer, args):
        return renderer.encode(texts, reference=x_init, size=size), 0, noise
    start, x = sdedit_start(x_init.expand(len(noise), -1, -1, -1), noise, sigmas, args.srr_strength)
    return renderer.encode(texts, size=size), start, x


def sde_window(start: int, n_sigmas: int, args: Args, gen: torch.Generator) -> range:
    """The W consecutive steps sampled by the SDE and trained: from a start drawn in [start, start +
    sde_window_start_max], never reaching the last step (sigma_next = 0: its log-prob overflows, Flow-GRPO).
    SDEdit starts late: the draw is capped so the window still fits (it shortens only if W steps cannot)."""
    last = n_sigmas - 3  # the last step that may be trained: step indices run 0..T-1 = n_sigmas - 2
    room = max(0, min(args.sde_window_start_max, last + 1 - args.sde_window - start))
    w0 = start + int(torch.randint(0, room + 1, (1,), generator=gen))
    return range(w0, min(w0 + args.sde_window, last + 1))


@dataclass
class Group:
    index: int  # k, the group's position in the step (all ranks agree on it)
    task: str  # 'rt2i' or 'srr'
    row: dict  # the prompt row with its questions
    text: TextRollout
    image: ImageRollout
    reward_future: Future
    init_image: Image.Image | None = None  # SRR: the shared initial image (no gradient)
    init_reward: float | None = None
    rewards: torch.Tensor | None = None  # (G,) raw rewards
    scores: dict | None = None  # per-question scores from the server
    advantages: torch.Tensor | None = None  # (G,)
    skip: bool = False  # SRR: no refinement of the whole step improved; dropped from the loss
    failed: torch.Tensor | None = None  # (G,) SRR: refinements that did not beat the initial image
    fpr_rewards: torch.Tensor | None = None  # (G,) SRR: rewards after FPR, which the advantages use


def questions(row: dict) -> tuple[list[str], list[str]]:
    """A prompt row's semantic and quality question texts."""
    return [q["question"] for q in row["semantic_questions"]], [q["question"] for q in row["quality_questions"]]


def renderer_text(prompt: str, reasoning: str) -> str:
    """What the renderer reads: the prompt first (SD3's CLIP encoders keep 77 tokens), then the reasoning."""
    return f"{prompt}. {reasoning}" if reasoning else prompt


def seed_torch_and_group_rng(args: Args, step: int, k: int) -> torch.Generator:
    """All randomness of group k at a step comes from (seed, step, k): a resumed run, or one on another
    number of GPUs, draws exactly the same samples. Seeds torch's global RNG (transformers' generate samples
    the reasoner's text from it) and returns the generator of the image noise."""
    seed = (args.seed * 1_000_003 + step) * 1009 + k
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def rollout_group(policy: Policy, row: dict, task: str, args: Args, gen: torch.Generator, client,
                  sigmas: torch.Tensor, init=None, timers=None, index: int = 0) -> Group:
    """Sample one group (Sec. 4.1): G reasoning texts, then G images conditioned on them, and send the
    images to the reward server without waiting. SRR: `init` = (initial image, its latents, its reward)."""
    reasoner = policy.reasoner
    renderer = policy.renderer
    G = args.group_size
    t0 = time.perf_counter()
    if task == "rt2i":  # y is a plan
        text = reasoner.generate(RT2I_INSTRUCTION.format(prompt=row["prompt"]), None, G)
    else:  # y is a diagnosis and a fix of the initial image (reflect mode, or verify: --reflection)
        text = reasoner.generate(REFLECTION[args.reflection].format(prompt=row["prompt"]), init[0], G)
    with torch.no_grad():
        text.old_logp = reasoner.token_logprobs(text)
        if args.beta_text > 0:
            with lora_disabled(reasoner.model):
                text.ref_logp = reasoner.token_logprobs(text)
    t1 = time.perf_counter()
    texts = [renderer_text(row["prompt"], y) for y in text.texts]
    noise = renderer.noise(1 if args.same_init_noise else G, gen).expand(G, -1, -1, -1)
    if task == "rt2i":  # from fresh noise, conditioned on the prompt and the plan
        cond = renderer.encode(texts)
        start = 0
        x = noise
    else:
        cond, start, x = refinement_inputs(renderer, args, texts, init[1], noise, sigmas)
    window = sde_window(start, len(sigmas), args, gen)
    x0, kept, logp = render(renderer, cond, x, sigmas, window, args.noise_level, gen, start=start)
    images = renderer.decode(x0)
    if timers is not None:
        timers["reason"] += t1 - t0
        timers["render"] += time.perf_counter() - t1
    sem, qual = questions(row)
    future = client.submit(images, [sem] * G, [qual] * G)
    image = ImageRollout(cond=cond, latents=kept, sigmas=sigmas[window.start:window.stop + 1],
                         second_sigma=float(sigmas[1]), old_logp=logp, images=images)
    return Group(index=index, task=task, row=row, text=text, image=image, reward_future=future,
                 init_image=init[0] if init else None, init_reward=init[2] if init else None)


@torch.no_grad()
def initial_candidates(policy: Policy, row: dict, args: Args, gen: torch.Generator, client):
    """SRR step 1 (Sec. 4.1): K initial images from the current policy with the deterministic ODE
    sampler and no reasoning, sent for scoring. Returns (images, future)."""
    renderer = policy.renderer
    cond = renderer.encode([row["prompt"]] * args.srr_candidates)
    x_T = renderer.noise(args.srr_candidates, gen)
    # as many steps as the refinements take (official code), so FPR compares images of the same sampler
    sigmas = renderer.sigmas(args.srr_init_steps or args.num_steps)
    x0, _, _ = render(renderer, cond, x_T, sigmas, range(0), 0.0)
    images = renderer.decode(x0)
    sem, qual = questions(row)
    return images, client.submit(images, [sem] * len(images), [qual] * len(images))


def pick_initial(images: list, rewards: list, how: str, gen: torch.Generator):
    """Keep the worst candidate (official code), or draw one with P ~ softmax(1 - R)."""
    r = torch.tensor(rewards, dtype=torch.float64)
    i = int(r.argmin()) if how == "min" else int(torch.multinomial(torch.softmax(1 - r, 0), 1, generator=gen))
    return images[i], rewards[i]


def rollout_step(policy: Policy, step: int, rows: list, args: Args, client, sigmas, timers, rank=0, world=1):
    """All rollouts of one step, with the current weights (never stale ones). This rank takes the groups
    k = rank, rank + world, ...; each group's images are scored while the next group is sampled. Groups
    k < n_srr are SRR. Their initial images come from the RT2I group k + n_srr, rolled out first (--srr-init
    rt2i, mix), or from candidates rendered before anything else, so that their scoring overlaps too."""
    srr_share = {"rt2i": 0.0, "srr": 1.0, "mix": args.mix_ratio}[args.task]
    n_srr = round(srr_share * args.groups_per_step)
    from_rt2i = args.task == "mix" and args.srr_init == "rt2i"
    mine = []  # this rank's groups: (k, task, prompt row); RT2I first, as an SRR group may refine one
    for k in sorted(range(rank, args.groups_per_step, world), key=lambda k: k < n_srr):
        task = "srr" if k < n_srr else "rt2i"
        position = k + n_srr if task == "srr" and from_rt2i else k  # the prompt of the RT2I group it refines
        mine.append((k, task, prompt_for(rows, step * args.groups_per_step + position, args.seed)))
    candidates = {k: initial_candidates(policy, row, args, seed_torch_and_group_rng(args, step, k), client)
                  for k, task, row in mine if task == "srr" and not from_rt2i}
    groups = {}
    for k, task, row in mine:
        gen = seed_torch_and_group_rng(args, step, k + 10_000)
        init = None
        if task == "srr":  # Sec. 4.1: the worst initial image of the prompt (scored), shared by the group
            rt2i = groups.get(k + n_srr)
            images, future = (rt2i.image.images, rt2i.reward_future) if from_rt2i else candidates[k]
            t0 = time.perf_counter()
            res = future.result()
            timers["reward_wait"] += time.perf_counter() - t0
            image, reward = pick_initial(images, res["rewards"], args.srr_pick, gen)
            init = (image, policy.renderer.encode_image(image), reward)
        groups[k] = rollout_group(policy, row, task, args, gen, client, sigmas, init, timers, index=k)
    return [groups[k] for k in sorted(groups)]


def collect_rewards_and_fpr(g: Group, args: Args):
    """Wait for the group's rewards; SRR groups then go through FPR (before normalization)."""
    res = g.reward_future.result()
    g.scores = res
    g.rewards = torch.tensor(res["rewards"], dtype=torch.float32)
    if g.task == "srr":
        g.failed = g.rewards <= g.init_reward
        if args.fpr:
            g.fpr_rewards, g.failed = false_positive_rectification(g.rewards, g.init_reward, args.fpr_value)


def skip_unimproved_step(groups: list, args: Args, world: int = 1):
    """FPR's step rule (Sec. 4.1, as the official code applies it): when no refinement of the step beat its
    initial image (on any rank), the step's SRR groups carry no signal and are dropped from the loss and its
    denominator; its RT2I groups still train. A lone group whose refinements all failed is not dropped: it
    keeps advantage 0 and its place in the denominator (`false_positive_rectification`)."""
    if not args.fpr or args.task == "rt2i":
        return
    srr = [g for g in groups if g.task == "srr"]
    improved = torch.tensor(float(sum(bool((~g.failed).any()) for g in srr)))
    if world > 1:
        torch.distributed.all_reduce(improved)
    for g in srr:
        g.skip = improved.item() == 0


def assign_advantages(groups: list, args: Args, world: int = 1) -> float:
    """Group-relative advantages (Sec. 3), each task normalized within its own groups. With std_mode 'batch'
    the std is over all groups of the step, on every rank. Returns this rank's share of zero-std groups."""
    zero = []  # per group: its rewards were all equal
    for task in ("rt2i", "srr"):
        task_groups = [g for g in groups if g.task == task]
        # (N,) the rewards the advantages use: SRR's after FPR
        used = [g.rewards if g.fpr_rewards is None else g.fpr_rewards for g in task_groups]
        r = torch.cat(used or [torch.zeros(0)])
        if world > 1 and args.std_mode == "batch":
            everyone = [None] * world
            torch.distributed.all_gather_object(everyone, r.tolist())
            batch_std = float(torch.tensor(sum(everyone, [])).double().std(unbiased=False))
        else:
            batch_std = None
        if not task_groups:
            continue
        ids = torch.cat([torch.full((len(g.rewards),), k) for k, g in enumerate(task_groups)])
        A, zero_std = group_advantages(r, ids, args.std_mode, batch_std=batch_std, adv_clip=args.adv_clip)
        for k, g in enumerate(task_groups):
            g.advantages = A[ids == k]
            zero.append(bool(zero_std[ids == k].all()))
    return sum(zero) / max(len(zero), 1)


# --------------------------------------------------------------------------------------------------
# Sec. 4.1: the unified objective and the update
# --------------------------------------------------------------------------------------------------


def group_logps(policy: Policy, g: Group, args: Args):
    """The current policy's log-probs of a stored group, computed exactly as at rollout time (the same
    functions): text (G, L) per token, image (G, W) per trained step, and the image KL to pi_ref (G, W)
    when beta_img > 0, else None."""
    renderer = policy.renderer
    im = g.image
    logp_text = policy.reasoner.token_logprobs(g.text)  # (G, L)
    # the rollout's context (official code: the image loss never reaches the shared stream), or with
    # --context-grad the same context recomputed with gradient (Cosmos3; the other renderers' is frozen)
    cond = renderer.fresh(im.cond, grad=True) if args.context_grad else im.cond
    if args.beta_image > 0:  # pi_ref = the same model with LoRA off, its context too
        with torch.no_grad(), lora_disabled(renderer.transformer):
            cond_ref = renderer.fresh(im.cond)
    logps = []
    kls = []
    for j in range(im.latents.shape[1] - 1):  # the W trained steps
        x, x_next = im.latents[:, j], im.latents[:, j + 1]
        s, s_next = float(im.sigmas[j]), float(im.sigmas[j + 1])
        v = renderer.velocity(x, s, cond)
        _, lp, mean, std = sde_step(v, x, s, s_next, args.noise_level, im.second_sigma, prev_sample=x_next)
        logps.append(lp)
        if args.beta_image > 0:
            with torch.no_grad(), lora_disabled(renderer.transformer):
                v_ref = renderer.velocity(x, s, cond_ref)
                _, _, mean_ref, _ = sde_step(v_ref, x, s, s_next, args.noise_level, im.second_sigma,
                                             prev_sample=x_next)
            kls.append(image_kl(mean, mean_ref, std, s_next - s, args.kl_flow_grpo_form))
    kl = torch.stack(kls, 1) if kls else None
    return logp_text, torch.stack(logps, 1), kl


def group_loss(policy: Policy, g: Group, args: Args):
    """L = L_text + lambda * L_img for one group (Sec. 4.1, unified objective): the same advantage A_i
    drives the reasoning tokens and every trained denoising step of trajectory i."""
    A = g.advantages.to(policy.device)  # (G,)
    logp_text, logp_img, kl = group_logps(policy, g, args)  # (G, L), (G, W), (G, W) or None
    l_text, text_clipfrac, text_kl = text_loss(logp_text, g.text.old_logp, g.text.ref_logp, A, g.text.mask,
                                               args.text_clip_low, args.text_clip_high, args.beta_text,
                                               args.seq_level_ratio)
    l_img, image_clipfrac = image_loss(logp_img, g.image.old_logp, A, args.image_clip, kl, args.beta_image)
    # Joint objective. The official code backpropagates text_loss_weight * K * L_text once and each of the
    # K image steps' losses separately, i.e. a gradient of K * (w * L_text + mean_k L_img_k): lambda = 1 / w,
    # with w = 1 in its RT2I configs and 1 / K in its SRR ones (Args.lam, Args.lam_srr).
    lam = args.lam if g.task == "rt2i" else (args.lam_srr or logp_img.shape[1])
    loss = l_text + lam * l_img
    stats = {"text_loss": l_text.item(), "image_loss": l_img.item(), "text_clipfrac": float(text_clipfrac),
             "image_clipfrac": float(image_clipfrac), "text_kl": None, "image_kl": None}
    if args.beta_text > 0:
        stats["text_kl"] = float(text_kl)
    if kl is not None:
        stats["image_kl"] = kl.mean().item()
    return loss, stats


def make_optimizer(policy: Policy, args: Args) -> torch.optim.Optimizer:
    """One AdamW over the LoRA weights of the sides that train (--train-reasoner, --train-renderer): the
    reasoner's at --reasoner-lr, the renderer's at --lr. A frozen side's LoRA needs no gradient and gets no
    update; its loss term is still computed, for the metrics."""
    sides = [(args.train_reasoner, policy.reasoner.lora_params, args.reasoner_lr or args.lr),
             (args.train_renderer, policy.renderer.lora_params, args.lr)]
    groups = []
    for trains, params, lr in sides:
        for p in params:
            p.requires_grad_(trains)
        if trains:
            groups.append({"params": params, "lr": lr})
    return torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)


def update(policy: Policy, optimizer, groups: list, args: Args, rng: random.Random, world: int = 1) -> list:
    """Minimize the unified objective (Sec. 4.1): `updates_per_rollout` optimizer steps, each on a disjoint
    share of the step's groups, drawn over the group indices by the same rng on every rank. The loss is the
    mean over the share's groups on all ranks (each backpropagates its sum / the global count; gradients
    all-reduced); a group skipped by FPR (`skip_unimproved_step`) is in no share and no count."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    order = list(range(args.groups_per_step))
    rng.shuffle(order)
    stats = []
    for u in range(args.updates_per_rollout):
        share = [g for k in order[u::args.updates_per_rollout] for g in groups if g.index == k and not g.skip]
        n = torch.tensor(float(len(share)))
        if world > 1:
            torch.distributed.all_reduce(n)
        if n == 0:
            continue
        for g in share:
            loss, group_stats = group_loss(policy, g, args)
            (loss / n).backward()
            stats.append(group_stats)
        if world > 1:
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                torch.distributed.all_reduce(p.grad)
        torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return stats


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


def train(args: Args, policy: Policy | None = None) -> str:
    """The training loop (one process, or one per GPU under torchrun). Returns the output folder."""
    rank, world, device = setup_distributed()
    # the run's folder and prompts, every cheap check done before a model loads
    out, rows, eval_rows = prepare_run(args, rank, world, check_renderer=policy is None)
    tags = question_tags(rows)  # every metrics row has a score_<tag> for each
    policy = policy or load_policy(args, out, device, rank, world)
    optimizer = make_optimizer(policy, args)
    start = load_checkpoint(args.resume, policy, optimizer, args) if args.resume else 0
    models = f"{type(policy.reasoner.model).__name__} + {type(policy.renderer.pipe).__name__}"
    if rank == 0:
        record_run(args, out, start, world, models)
    if args.dry_run and not args.reward_url:
        server, client = None, RandomRewards()  # the dry run's random rewards need no server
    else:
        server, client = connect_reward_server(args)
    sigmas = policy.renderer.sigmas(args.num_steps)  # (T+1,) the rollout sampler's schedule
    if rank == 0:
        print(f"training {args.preset}/{args.task} ({args.policy}: {models}), steps {start}.."
              f"{args.steps - 1}, {world} process(es) on {policy.device}; reward server {args.reward_url}; "
              f"writing {out}")
    try:
        for step in tqdm(range(start, args.steps), desc="train", dynamic_ncols=True, disable=rank != 0):
            # evaluation first: its row's eval_* keys are the policy after `step` updates (step 0: before any)
            evaluation = {}
            if args.eval_every and step % args.eval_every == 0:
                evaluation = evaluate(policy, eval_rows, args, client, eval_grid(out, step), rank, world)
            t_step = time.perf_counter()
            timers = {"reason": 0.0, "render": 0.0, "reward_wait": 0.0, "train": 0.0}
            # 1. G trajectories o_i = (y_i, x_i) per prompt, scored in the background (Sec. 4.1)
            groups = rollout_step(policy, step, rows, args, client, sigmas, timers, rank, world)
            # 2. their DVRewards (Sec. 4.2); SRR groups through FPR (Sec. 4.1)
            t0 = time.perf_counter()
            for g in groups:
                collect_rewards_and_fpr(g, args)
            skip_unimproved_step(groups, args, world)
            timers["reward_wait"] += time.perf_counter() - t0
            # 3. group-relative advantages (Sec. 3), shared by the text and the image of a trajectory
            zero_std_frac = assign_advantages(groups, args, world)
            # 4. the unified objective L_text + lambda L_img, minimized on the step's groups (Sec. 4.1)
            t0 = time.perf_counter()
            stats = update(policy, optimizer, groups, args, random.Random(args.seed * 31 + step), world)
            timers["train"] = time.perf_counter() - t0
            timers["step"] = time.perf_counter() - t_step
            log_step(step, groups, stats, zero_std_frac, timers, evaluation, tags, args, out, rank, world)
            last = step == args.steps - 1
            if rank == 0 and args.save_every and ((step + 1) % args.save_every == 0 or last):
                save_checkpoint(policy, optimizer, args, step + 1, out)  # after the step's metrics row
        if args.eval_every and start < args.steps:  # the trained policy: a row of its own, `step` = steps
            evaluation = evaluate(policy, eval_rows, args, client, eval_grid(out, args.steps), rank, world)
            log_evaluation(args.steps, evaluation, args, out, rank)
    except RewardError as e:  # a verifier down for longer than --reward-patience: say what is kept
        raise RewardError(where_it_stopped(e, step, out)) from None
    finally:
        client.close()
        if server is not None:
            server.terminate()
        if world > 1:
            torch.distributed.destroy_process_group()
    return out


# --------------------------------------------------------------------------------------------------
# Inference: reasoning, then rounds of self-reflective refinement (Sec. 4.1, inference-time SRR)
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def draw(policy: Policy, args: Args, prompt: str, gen: torch.Generator, reasoning: bool = True):
    """Round 0 (RT2I): plan with RT2I_INSTRUCTION (no plan with reasoning off), then the ODE sampler from
    fresh noise drawn from `gen`. Returns (PIL image, text)."""
    renderer = policy.renderer
    text = ""
    if reasoning:
        text = policy.reasoner.generate(RT2I_INSTRUCTION.format(prompt=prompt), None, 1).texts[0]
    x0, _, _ = render(renderer, renderer.encode([renderer_text(prompt, text)]), renderer.noise(1, gen),
                      renderer.sigmas(args.eval_num_steps), range(0), 0.0)
    return renderer.decode(x0)[0], text


@torch.no_grad()
def refine(policy: Policy, args: Args, prompt: str, image: Image.Image, gen: torch.Generator,
           reasoning: bool = True, instruction: str = "", size: tuple | None = None):
    """One SRR round: the reasoner looks at `image` with `instruction` (default: --reflection's; GEdit-Bench:
    EDIT_INSTRUCTION), then the renderer redraws it as training does (`refinement_inputs`), at `size` (H, W),
    by default the image's aspect ratio (`edit_size`). Returns (PIL image, text)."""
    renderer = policy.renderer
    size = size or renderer.edit_size(image)
    sigmas = renderer.sigmas(args.eval_num_steps, size)
    text = ""
    if reasoning:
        instruction = instruction or REFLECTION[args.reflection]
        text = policy.reasoner.generate(instruction.format(prompt=prompt), image, 1).texts[0]
    # in context: the reference as the pipeline encodes it (its own size); SDEdit: the start, at the edit's
    x_init = renderer.encode_image(image, None if refines_in_context(renderer, args) else size)
    cond, start, x = refinement_inputs(renderer, args, [renderer_text(prompt, text)], x_init,
                                       renderer.noise(1, gen, size), sigmas)
    x0, _, _ = render(renderer, cond, x, sigmas, range(0), 0.0, start=start)
    return renderer.decode(x0)[0], text


def main(argv=None):
    command, args, extra = parse_args(argv)
    quiet_library_logs()
    try:
        if command == "train" and args.dry_run:
            dry_run(args)
        elif command == "train" and args.steps == 0:
            print("--steps 0: nothing to train, nothing written")
        elif command == "train":
            out = train(args)
            if int(os.environ.get("RANK", 0)) == 0:
                print(run_summary(out))
        elif command == "bench":
            bench(args, **extra)
        elif command == "eval":
            evaluate_benchmark(args, **extra)
        else:
            sample(args, **extra)
    except (RewardError, ValueError) as e:  # bad input or a verifier that is down: say what and where
        raise SystemExit(f"error: {e}") from None
    except KeyboardInterrupt:
        if command == "eval":
            raise SystemExit("interrupted: the same command continues where this one stopped") from None
        raise SystemExit("interrupted: metrics.jsonl holds every finished step; --resume OUT continues from "
                         "the last checkpoint") from None


# ==================================================================================================
# APPENDIX. What a reader of the method can skip: the command line, model loading, the decoupled policy's
# renderers (FLUX.2 klein, Stable Diffusion 3.5), the reward client's HTTP and retries, prompt-file checking,
# run plumbing, metrics and evaluation, checkpoints, the toy models and their priors, benchmark outputs, and
# the memory plan, dry run and bench.
# ==================================================================================================


# --------------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------------


# Cosmos3-Edge's reasoner: LoRA on its language model's attention and relu2 MLP (fc1/fc2), not on its SigLIP2
# vision tower, whose layers have the same names
EDGE_REASONER_LORA_TARGETS = ",".join(f"language_model.*.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj",
                                                                          "fc1", "fc2"))

# The presets: Args' values for each setting (--preset), before the flags (README, "Training on real
# checkpoints").
PRESETS = {
    # The toy world on the CPU: Args' defaults (README, "The toy world").
    "toy": dict(),
    # The recommended real preset, on one 80 GB GPU. FLUX.2 klein base 4B (Apache-2.0, not gated) can edit, so
    # SRR refines in context. Settings of Flow-Factory's flux2_klein_base GRPO config: 8 training steps, 28 at
    # evaluation, CFG 4.0, noise 0.7, image clip 1e-4, LoRA r 64 / alpha 128 at lr 3e-4 on attention and MLP
    # projections, group 16; Flow-Factory trains one SDE step drawn from steps 1-3, we train W = 2 consecutive
    # steps starting at 0-2 (the same early part of the schedule). The reasoner's lr is the official 5e-5.
    "klein": dict(
        reasoner="Qwen/Qwen3-VL-4B-Instruct", renderer="black-forest-labs/FLUX.2-klein-base-4B",
        prompts="prompts.jsonl", dtype="bfloat16", steps=1000, resolution=512, num_steps=8, eval_num_steps=28,
        sde_window=2, sde_window_start_max=2, guidance_scale=4.0, max_new_tokens=256, max_text_tokens=512,
        image_clip=1e-4, lr=3e-4, reasoner_lr=5e-5, lora_rank=64, lora_alpha=128.0,
        group_size=16, groups_per_step=4, srr_candidates=4, std_mode="group", gradient_checkpointing=True,
    ),
    # Real checkpoints on one 80 GB GPU (settings of Flow-GRPO's SD3.5 config and the official code): the
    # preset to compare with Flow-GRPO. SD3.5 cannot edit: its SRR refines by SDEdit.
    # The unified policy on one 80 GB GPU: Cosmos3-Nano (16B: a Qwen3-VL-8B that reasons, a generation stream
    # of the same size that draws) names both halves. Its pipeline's defaults: 35 steps, CFG 6; the sampler
    # settings otherwise follow klein's (README: G 8 fits 80 GB at 512 px with checkpointing). LoRA as the
    # official code trains BAGEL: r 32 / alpha 64 on q/k/v/o and the MLP of both streams, one lr 5e-5.
    "cosmos3": dict(
        policy="unified", reasoner="nvidia/Cosmos3-Nano", renderer="nvidia/Cosmos3-Nano",
        prompts="prompts.jsonl",
        dtype="bfloat16", steps=1000, resolution=512, num_steps=10, eval_num_steps=35, sde_window=2,
        sde_window_start_max=2, guidance_scale=6.0, max_new_tokens=256, max_text_tokens=512, image_clip=1e-4,
        lr=5e-5, reasoner_lr=5e-5, lora_rank=32, lora_alpha=64.0, group_size=8, groups_per_step=4,
        srr_candidates=4, std_mode="group", gradient_checkpointing=True,
    ),
    # The unified policy on one 24-48 GB GPU: Cosmos3-Edge (about 4B: a Nemotron understanding stream that
    # reasons, 28 layers of 2048, and a generation stream of the same size; public, OpenMDW-1.1). Its image
    # recipe (the serving code's text-to-image defaults; the model card documents image-to-video only):
    # 640 x 640, 50 steps at CFG 4 (cosmos-framework, TensorRT-LLM; sglang: CFG 7 on an interval, which ours
    # does not implement). LoRA and lr as the official code trains BAGEL, on its language model only.
    "cosmos3-edge": dict(
        policy="unified", reasoner="nvidia/Cosmos3-Edge", renderer="nvidia/Cosmos3-Edge", prompts="prompts.jsonl",
        dtype="bfloat16", steps=1000, resolution=640, num_steps=10, eval_num_steps=50, sde_window=2,
        sde_window_start_max=2, guidance_scale=4.0, max_new_tokens=256, max_text_tokens=512, image_clip=1e-4,
        lr=5e-5, reasoner_lr=5e-5, lora_rank=32, lora_alpha=64.0, reasoner_lora_targets=EDGE_REASONER_LORA_TARGETS,
        group_size=8, groups_per_step=4, srr_candidates=4, std_mode="group", gradient_checkpointing=True,
    ),
    "sd35": dict(
        reasoner="Qwen/Qwen3-VL-4B-Instruct", renderer="stabilityai/stable-diffusion-3.5-medium",
        prompts="prompts.jsonl", dtype="bfloat16", steps=1000, resolution=512, num_steps=10,
        eval_num_steps=40, sde_window=4, sde_window_start_max=3, guidance_scale=4.5, max_new_tokens=256,
        max_text_tokens=256, reasoner_lr=5e-5,
        image_clip=1e-4, lr=5e-5, lora_rank=32, lora_alpha=64.0, gradient_checkpointing=True,
        group_size=8, groups_per_step=4, srr_candidates=4, srr_strength=0.7,
    ),
}


# Each Args field's valid values, checked by `check_args` once the preset and the flags are merged, before
# anything loads: a numeric (low, high, [why]) range, inclusive, None for unbounded, a bound in a list
# exclusive ([0]: above 0); choices; or None, any text (paths and names, checked where they are read).
ARG_RANGES = dict(
    preset=tuple(PRESETS), policy=("unified", "decoupled"), task=("rt2i", "srr", "mix"), steps=(0, None),
    out=None, seed=(0, None), device=None, dtype=("float32", "bfloat16"), reward_url=None, reward_token=None,
    reward_patience=(0, None), reasoner=None, renderer=None, toy_cache=None, prompts=None,
    group_size=(2, None, "a group of one has no relative advantage"), groups_per_step=(1, None),
    updates_per_rollout=(1, None), resolution=(16, None), num_steps=(2, None), eval_num_steps=(1, None),
    sde_window=(1, None), sde_window_start_max=(0, None),
    noise_level=([0], None, "the rollout's SDE steps need a density (0 is the ODE)"), guidance_scale=(0, None),
    max_new_tokens=(1, None), max_text_tokens=(1, None), temperature=([0], None),
    text_clip_low=(0, [1], "the ratio's lower clip 1 - low must stay above 0"), text_clip_high=(0, None),
    image_clip=([0], None), adv_clip=([0], None, "a clip at or below 0 sets every advantage alike"),
    beta_text=(0, None), beta_image=(0, None), lam=(0, None, "a negative lambda maximizes the image loss"),
    lam_srr=(0, None), std_mode=("group", "batch"), lr=([0], None), reasoner_lr=(0, None),
    weight_decay=(0, None), grad_clip=([0], None), lora_rank=(1, None), lora_alpha=([0], None),
    reasoner_lora_targets=None, renderer_lora_targets=None, sample_every=(0, None), eval_every=(0, None),
    save_every=(0, None), resume=None, srr_init=("rt2i", "candidates"), srr_candidates=(1, None),
    srr_init_steps=(0, None), reflection=("reflect", "verify"), srr_pick=("min", "sample"),
    srr_refine=("auto", "edit", "sdedit"), srr_strength=(0, 1), fpr_value=("init", "group-min"),
    mix_ratio=(0, 1, "the share of the groups that are SRR"),
    **{f.name: (False, True) for f in dataclasses.fields(Args) if f.type == "bool"})


def check_args(args: Args) -> str | None:
    """The first field of `args` outside its ARG_RANGES entry, as '--flag VALUE: why, what is allowed'."""
    for f in dataclasses.fields(Args):
        allowed, v, flag = ARG_RANGES[f.name], getattr(args, f.name), "--" + f.name.replace("_", "-")
        if allowed is None:
            continue
        if f.type not in ("int", "float"):
            if v not in allowed:
                return f"{flag} {v!r}: must be one of {', '.join(map(str, allowed))}"
            continue
        lo, hi, why = (*allowed, "")[:3]
        if not ((lo is None or (v > lo[0] if isinstance(lo, list) else v >= lo)) and
                (hi is None or (v < hi[0] if isinstance(hi, list) else v <= hi))):
            bound = lambda b, op: f"{op[isinstance(b, list)]} {b[0] if isinstance(b, list) else b}"  # noqa: E731
            allowed = " and ".join(bound(b, op) for b, op in ((lo, (">=", ">")), (hi, ("<=", "<")))
                                   if b is not None)
            return f"{flag} {v}: {why + ', ' if why else ''}must be {allowed}"
    return None


def parse_args(argv=None) -> tuple[str, Args, dict]:
    """`[train|sample|eval|bench] --flag value ...` -> (command, Args, the command's extra options). Help text
    comes from the field docstrings above; a preset's values apply first and explicit flags override them."""
    source = ast.parse(open(__file__, encoding="utf-8").read() if "__file__" in globals() else "")
    docs = {}
    body = next((n.body for n in source.body if isinstance(n, ast.ClassDef) and n.name == "Args"), [])
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr):
            docs[node.target.id] = nxt.value.value
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in ("train", "sample", "bench", "eval") else "train"
    p = argparse.ArgumentParser(prog=f"alphagrpo.py {command}", argument_default=argparse.SUPPRESS,
                                usage=f"alphagrpo.py {command} [--flag VALUE ...]  (--help: every flag)")
    for f in dataclasses.fields(Args):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=docs.get(f.name))
        else:
            p.add_argument(flag, type={"int": int, "float": float}.get(f.type, str), help=docs.get(f.name))
    if command == "sample":
        what = p.add_mutually_exclusive_group(required=True)
        what.add_argument("--prompt", help="the request to draw")
        what.add_argument("--test-prompts", action="store_true", help="every test prompt of the prompt set "
                          "(the toy's 24), each in OUT/<index>/, then the rewards per round (rounds_summary)")
        p.add_argument("--refine-rounds", type=int, default=0,
                       help="reflect-and-refine rounds after the first image")
        p.add_argument("--checkpoint", default="",
                       help="a checkpoint (or run) folder whose LoRA weights to load")
        p.add_argument("--question", action="append", default=[], help="a DVReward question for the reward "
                       "(repeatable); default: the prompt's questions in the prompt set, if it is there")
    if command in ("sample", "eval"):
        p.add_argument("--refine-below", default="", metavar="TAU|question",
                       help="the verifier gate: a round refines only an image whose DVReward is below TAU "
                       "(or, with 'question', where any question's P(yes) < 0.5) and keeps the others "
                       "unchanged; needs the prompts' DVReward questions and a reward server")
    if command == "eval":
        p.add_argument("--benchmark", required=True, choices=sorted(BENCHMARKS),
                       help="the benchmark (README)")
        p.add_argument("--data", required=True, help="its prompt file or folder, from your clone (README)")
        p.add_argument("--refine-rounds", type=int, default=0,
                       help="reflect-and-refine rounds, each in its own tree")
        p.add_argument("--checkpoint", default="",
                       help="a checkpoint (or run) folder whose LoRA weights to load")
        p.add_argument("--reasoning", action=argparse.BooleanOptionalAction, default=True,
                       help="round 0 plans before drawing (GEdit-Bench: describes the edit); --no-reasoning "
                       "draws it from the prompt alone, as the official scripts do; refinement rounds "
                       "always reflect")
        p.add_argument("--samples-per-prompt", type=int, default=0,
                       help="K images a prompt; 0: the benchmark's "
                       "default (GenEval 4, DPG-Bench 4 in a 2x2 grid, WISE, TIIF-Bench and GEdit-Bench 1)")
        p.add_argument("--limit", type=int, default=0, help="only the first N prompts (0: all)")
        p.add_argument("--refine-only-wrong", default="", metavar="RESULTS",
                       help="the paper's protocol: with --refine-rounds 1, refine only the round-0 images that "
                       "the benchmark's own scorer marked wrong in RESULTS (GenEval's results.jsonl, "
                       "DPG-Bench's results .txt, TIIF-Bench's --output_dir) and copy the others unchanged")
    if command == "bench":
        p.add_argument("--verifier", default="",
                       help="the reward server's verifier, started on this device for the training-step "
                       "figures (default: random:qwen3-vl-8b for the real presets, random:small for toy); "
                       "--reward-url uses a running server instead")
        p.add_argument("--repeats", type=int, default=3,
                       help="timed runs of each sampler (after one warm-up)")
        p.add_argument("--layers", type=int, default=0,
                       help="keep this many of the preset's text layers (both Cosmos3 streams): a slice "
                       "of the real widths that a CPU can run; 0: all")
        p.add_argument("--train-step", action=argparse.BooleanOptionalAction, default=True,
                       help="also time two training steps with a reward server (section 3)")
    given = vars(p.parse_args(argv))
    command_options = ("prompt", "test_prompts", "refine_rounds", "checkpoint", "question", "verifier",
                       "repeats", "layers", "train_step", "benchmark", "data", "reasoning",
                       "samples_per_prompt", "limit", "refine_below", "refine_only_wrong")
    extra = {k: given.pop(k) for k in command_options if k in given}
    gate = extra.get("refine_below", "")
    if gate and gate != "question":
        try:
            float(gate)
        except ValueError:
            p.error(f"--refine-below takes a reward TAU (a number) or 'question', not {gate!r}")
    if extra.get("refine_only_wrong") and (gate or extra.get("refine_rounds") != 1):
        p.error("--refine-only-wrong reads the scorer's judgement of round 0: it takes --refine-rounds 1 and "
                "no --refine-below")
    preset = given.get("preset", Args.preset)
    if preset not in PRESETS:
        p.error(f"--preset must be one of {sorted(PRESETS)}, not {preset!r}")
    # The unified toy's shared stream is also what its generator reads: at the pair's 1e-3 the plan's
    # updates move it faster than the generation stream follows (README: unified vs decoupled)
    unified_toy = {"reasoner_lr": 3e-4} if (preset, given.get("policy")) == ("toy", "unified") else {}
    args = Args(**{**PRESETS[preset], **unified_toy, **given})
    problem = check_args(args)
    for name, lo in (("refine_rounds", 0), ("samples_per_prompt", 0), ("limit", 0), ("repeats", 1),
                     ("layers", 0)):
        if problem is None and extra.get(name, lo) < lo:
            problem = f"--{name.replace('_', '-')} {extra[name]}: must be >= {lo}"
    for flag, path in (("--checkpoint", extra.get("checkpoint")), ("--resume", args.resume),
                       ("--prompts", args.prompts), ("--refine-only-wrong", extra.get("refine_only_wrong"))):
        if problem is None and path and not os.path.exists(path):
            problem = f"{flag} {path}: no such file or folder"
    if problem:
        p.error(problem)
    if args.preset != "toy" and "renderer" not in given and args.policy != PRESETS[preset].get("policy",
                                                                                              "decoupled"):
        p.error(f"--policy {args.policy} with --preset {preset}: the preset's models are a "
                f"{PRESETS[preset].get('policy', 'decoupled')} policy (--renderer names another checkpoint)")
    multiple = 32 if args.policy == "unified" and args.preset != "toy" else 16  # pixels of one latent patch
    if args.resolution % multiple:
        p.error(f"--resolution {args.resolution}: must be a multiple of {multiple} (whole latent patches)")
    if not 0 < args.sde_window or args.sde_window_start_max + args.sde_window > args.num_steps - 1:
        p.error("the SDE window must fit in the first T-1 steps: "
                "sde_window_start_max + sde_window <= num_steps - 1")
    if args.task != "rt2i" and args.srr_refine != "edit" and round(args.srr_strength * args.num_steps) < 2:
        p.error("--srr-strength too low: the refinement needs at least 2 of the --num-steps steps")
    n_srr = round(args.mix_ratio * args.groups_per_step)
    if args.task == "mix" and args.srr_init == "rt2i" and n_srr > args.groups_per_step - n_srr:
        p.error(f"--task mix with --srr-init rt2i pairs each SRR group with an RT2I group of the same prompt: "
                f"--mix-ratio {args.mix_ratio} of --groups-per-step {args.groups_per_step} gives {n_srr} SRR "
                "groups, more than the RT2I ones (or: --srr-init candidates)")
    if args.groups_per_step < args.updates_per_rollout:
        p.error("--groups-per-step must be at least --updates-per-rollout (each update needs a group)")
    if args.context_grad and args.policy != "unified":
        p.error("--context-grad is for --policy unified (the decoupled renderers' text encoders are frozen)")
    if not (args.train_reasoner or args.train_renderer):
        p.error("--no-train-reasoner and --no-train-renderer together leave nothing to train")
    return command, args, extra


def quiet_library_logs():
    """No download progress bars, and not the CLIP encoders' note that they keep 77 tokens: by design the
    prompt comes first and T5 reads the rest (SD3)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()
    sd3 = "diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3"
    diffusers_logging.get_logger(sd3).addFilter(lambda record: "truncated because" not in record.getMessage())
    transformers_logging.get_logger("transformers.tokenization_utils_base").addFilter(
        lambda record: "sequence length is longer than" not in record.getMessage())


# --------------------------------------------------------------------------------------------------
# Loading the models: the renderer's kind first (cheap checks before any download), then from_pretrained
# --------------------------------------------------------------------------------------------------


def renderer_kind(path: str) -> str:
    """'klein', 'sd3' or 'cosmos3', from the class its model_index.json names (a small file, read
    before any model loads)."""
    from diffusers import DiffusionPipeline

    try:
        name = DiffusionPipeline.load_config(path)["_class_name"]
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"cannot read the renderer {path!r} (--renderer): no pipeline's model_index.json "
                         f"there ({type(e).__name__}: {e})") from None
    kinds = {"Flux2KleinPipeline": "klein", "StableDiffusion3Pipeline": "sd3",
             "Cosmos3OmniPipeline": "cosmos3"}
    if name not in kinds:
        raise ValueError(f"{path}: unknown renderer kind {name!r}; AlphaGRPO drives {' or '.join(kinds)}")
    import diffusers  # a component of a class this diffusers lacks (e.g. a newer scheduler) cannot load

    missing = [f"{part} ({cls[1]})" for part, cls in DiffusionPipeline.load_config(path).items()
               if isinstance(cls, list) and len(cls) == 2 and cls[0] == "diffusers" and cls[1]
               and not hasattr(diffusers, cls[1])]
    if missing:
        raise ValueError(f"{path}: diffusers {diffusers.__version__} has no class for its {', '.join(missing)}; "
                         "a newer diffusers may (requirements.txt pins the one the code is checked against)")
    return kinds[name]


def model_paths(args: Args) -> tuple[str, str, bool]:
    """(reasoner path, renderer path, whether the toy world is needed): the toy preset's models are the toy
    world's, built once and cached in toy_world_dir."""
    toy = args.preset == "toy" and not (args.reasoner and args.renderer)
    folder = toy_world_dir(args) if toy else ""
    reasoner = args.reasoner or os.path.join(folder, "reasoner")
    renderer = args.renderer or os.path.join(folder, "renderer")
    return reasoner, renderer, toy


def check_models(args: Args, out: str):
    """The cheap checks, before any model loads (or downloads): the renderer's kind fits --policy, it can
    refine SRR as asked, and (unified) the reasoner's language model has the shapes of the generator's
    understanding stream, which it replaces (`share_understanding_stream`)."""
    from diffusers import Cosmos3OmniTransformer
    from transformers import AutoConfig

    reasoner, renderer, toy = model_paths(args)
    if toy and not args.renderer:
        return  # the toy world's models fit by construction (and may not be built yet)
    kind = renderer_kind(renderer)
    if (kind == "cosmos3") != (args.policy == "unified"):
        raise ValueError(f"--policy {args.policy} with a {kind} renderer: the unified policy is one Cosmos3 "
                         f"checkpoint (--reasoner and --renderer both name it), the decoupled one a FLUX.2 "
                         f"klein or SD3 renderer beside a Qwen3-VL reasoner")
    if args.srr_refine == "edit" and kind == "sd3":
        raise ValueError("--srr-refine edit needs a renderer that takes a reference image (FLUX.2 klein or "
                         "Cosmos3); Stable Diffusion 3 can only refine by --srr-refine sdedit")
    if kind == "cosmos3":
        try:
            text = AutoConfig.from_pretrained(reasoner).get_text_config()
            gen = Cosmos3OmniTransformer.load_config(renderer, subfolder="transformer")
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read the configs of {reasoner!r} and {renderer!r}: {e}") from None
        keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "hidden_act")
        diff = [f"{k} {getattr(text, k, None)} vs {gen.get(k)}" for k in keys
                if getattr(text, k, None) != gen.get(k)]
        if diff:
            raise ValueError(f"the reasoner {reasoner!r} is not the understanding stream of the generator "
                             f"{renderer!r} ({', '.join(diff)}): the unified policy needs both from one "
                             f"checkpoint")
        targets = args.reasoner_lora_targets.split(",")
        if text.model_type == "cosmos3_edge_text" and not all("language_model" in t for t in targets):
            raise ValueError(f"--reasoner-lora-targets {args.reasoner_lora_targets!r}: Cosmos3-Edge's vision "
                             "tower has q/k/v_proj and fc1/fc2 too, and its language model's MLP is fc1/fc2; "
                             "name the language model's layers, as the cosmos3-edge preset does: "
                             f"{EDGE_REASONER_LORA_TARGETS}")


def share_understanding_stream(transformer: nn.Module, model: nn.Module):
    """Make one network of the two classes (the unified policy): Cosmos3's transformer (diffusers) holds an
    understanding stream that *is* the reasoner's language model (transformers reads it from the same
    checkpoint: Cosmos3OmniForConditionalGeneration, a Qwen3-VL, for Nano; Cosmos3EdgeForConditionalGeneration,
    a Nemotron with a relu2 MLP fc1/fc2, which diffusers names up_proj/down_proj, and no text q/k norms, for
    Edge). Replace the transformer's copy with the reasoner's own modules and parameters, so that the weights
    exist once and the reasoner's LoRA (already on q/k/v/o and the MLP) is in both: the text loss and the image
    loss reach the same tensors. The generation stream keeps its own."""
    lm = model.model.language_model
    pairs = [("embed_tokens", lm.embed_tokens), ("norm", lm.norm), ("lm_head", model.lm_head)]
    for block, layer in zip(transformer.layers, lm.layers, strict=True):
        a, b = block.self_attn, layer.self_attn
        # Edge has no text q/k norm: the transformer's must then be parameter-free too (Identity)
        pairs += [(a.to_q, b.q_proj), (a.to_k, b.k_proj), (a.to_v, b.v_proj), (a.to_out, b.o_proj),
                  (a.norm_q, getattr(b, "q_norm", nn.Identity())), (a.norm_k, getattr(b, "k_norm", nn.Identity())),
                  (block.mlp, layer.mlp), (block.input_layernorm, layer.input_layernorm),
                  (block.post_attention_layernorm, layer.post_attention_layernorm)]
    pairs = [(getattr(transformer, p) if isinstance(p, str) else p, q) for p, q in pairs]
    diffusers_name = {"fc1": "up_proj", "fc2": "down_proj"}
    for ours, theirs in pairs:
        mine = {n: t.shape for n, t in ours.named_parameters()}
        shared = {".".join(diffusers_name.get(x, x) for x in n.replace("base.", "").split(".")): t.shape
                  for n, t in theirs.named_parameters() if ".lora_" not in n and not n.startswith("lora_")}
        if mine != shared:
            raise ValueError(f"the generator's understanding stream does not match the reasoner's language "
                             f"model ({type(ours).__name__} {mine} vs {type(theirs).__name__} {shared})")
    with torch.no_grad():
        transformer.embed_tokens.weight = lm.embed_tokens.weight
        transformer.norm.weight = lm.norm.weight
        transformer.lm_head.weight = model.lm_head.weight
    for block, layer in zip(transformer.layers, lm.layers):
        a, b = block.self_attn, layer.self_attn
        # Linear layers as modules (their LoRA with them), norms as parameters (each class keeps its own code)
        a.to_q, a.to_k, a.to_v, a.to_out = b.q_proj, b.k_proj, b.v_proj, b.o_proj
        if hasattr(b, "q_norm"):  # Qwen3-VL: its MLP module, and its text q/k norms
            block.mlp = layer.mlp
            a.norm_q.weight, a.norm_k.weight = b.q_norm.weight, b.k_norm.weight
        else:  # Edge: the same relu2 MLP in diffusers' code and names, on the reasoner's fc1/fc2
            block.mlp.up_proj, block.mlp.down_proj = layer.mlp.fc1, layer.mlp.fc2
        block.input_layernorm.weight = layer.input_layernorm.weight
        block.post_attention_layernorm.weight = layer.post_attention_layernorm.weight


def load_policy(args: Args, out: str, device=None, rank: int = 0, world: int = 1) -> Policy:
    """Build (toy, on rank 0) or load the reasoner and the renderer, with LoRA, on the device and dtype."""
    device = device or torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                                    "cpu" if args.device == "auto" else args.device)
    dtype = getattr(torch, args.dtype)
    reasoner_path, renderer_path, toy = model_paths(args)
    # The toy models are fixed artifacts, like real checkpoints: the same weights whatever --seed says.
    if toy and rank == 0:
        build_toy_world(toy_world_dir(args), args.policy)
    if world > 1:
        torch.distributed.barrier()  # the other ranks load what rank 0 wrote
    from diffusers import Cosmos3OmniPipeline, Flux2KleinPipeline, StableDiffusion3Pipeline
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(reasoner_path)
        model = AutoModelForImageTextToText.from_pretrained(reasoner_path, dtype=dtype)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load the reasoner {reasoner_path!r} (--reasoner): {e}") from None
    kind = renderer_kind(renderer_path)
    try:
        if kind == "cosmos3":  # its guardrail needs the cosmos_guardrail package; our prompts are the user's
            pipe = Cosmos3OmniPipeline.from_pretrained(renderer_path, dtype=dtype, safety_checker=None,
                                                       enable_safety_checker=False)
        else:
            pipeline = Flux2KleinPipeline if kind == "klein" else StableDiffusion3Pipeline
            pipe = pipeline.from_pretrained(renderer_path, dtype=dtype, low_cpu_mem_usage=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load the renderer {renderer_path!r} (--renderer; SD3.5 is gated: accept "
                         f"its licence and `hf auth login`): {e}") from None
    torch.manual_seed(args.seed)  # the LoRA init
    if kind == "cosmos3":  # one network: the reasoner's LoRA first, then its modules become the stream's
        reasoner = Reasoner(processor, model, device, args)
        return Policy(reasoner, CosmosRenderer(pipe, device, args, reasoner.model), device)
    renderer = KleinRenderer(pipe, device, args) if kind == "klein" else SD3Renderer(pipe, device, args)
    return Policy(Reasoner(processor, model, device, args), renderer, device)


# --------------------------------------------------------------------------------------------------
# The decoupled policy's renderers, behind the same interface: FLUX.2 klein (which edits in context, as the
# unified model refines) and Stable Diffusion 3.5 (its SRR refines by SDEdit)
# --------------------------------------------------------------------------------------------------


class KleinRenderer(Renderer):
    """FLUX.2 klein (`Flux2KleinPipeline`): a Qwen3 text encoder read at three hidden layers, a transformer
    over latent tokens. x is the pipeline's normalized latent: the VAE's 32 channels patchified 2x2 into 128,
    then standardized by the VAE's batch-norm statistics, (B, 128, h, w); it is packed into h*w tokens with
    4-axis position ids (time, row, column, layer) only for the transformer. A reference image (SRR's initial
    image) enters as more tokens of the same kind at time 10: the model sees it and redraws from noise."""

    can_edit = True
    # attention (double-stream q/k/v/out and their text twins; single-stream fused qkv+mlp and out) and MLP
    # projections, named as diffusers' FLUX.2 LoRA loader reads them (Flow-Factory's and DiffSynth's targets)
    lora_targets = ("to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out,"
                    "linear_in,linear_out,to_qkv_mlp_proj,attn.to_out")

    def __init__(self, pipe, device, args: Args):
        super().__init__(pipe, device, args)
        self.scale = 2 * self.pipe.vae_scale_factor  # the VAE's 8x, then the 2x2 patchify
        self.multiple = self.scale
        self.latent_channels = self.transformer.config.in_channels
        n = self.pipe.text_encoder.config.num_hidden_layers
        self.text_layers = (n // 4, n // 2, 3 * n // 4)  # (9, 18, 27) for klein's 36-layer Qwen3
        bn = self.vae.bn
        self.bn_mean = bn.running_mean.view(1, -1, 1, 1).float().to(device)
        bn_var = bn.running_var.view(1, -1, 1, 1).float().to(device)
        self.bn_std = torch.sqrt(bn_var + self.vae.config.batch_norm_eps)
        # distilled klein models (4 steps) take no guidance; base models use CFG like SD3
        self.distilled = bool(self.pipe.config.get("is_distilled", False))

    def sigmas(self, num_steps: int, size: tuple | None = None) -> torch.Tensor:
        """The pipeline's schedule: linspace(1, 1/T) shifted by mu, which grows with the token count h*w of an
        image of `size` (None: the --resolution square)."""
        import numpy as np
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

        h, w = self.latent_hw(size)
        mu = compute_empirical_mu(h * w, num_steps)
        self.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu, device="cpu")
        return self.scheduler.sigmas.float().cpu()

    @torch.no_grad()
    def encode(self, texts: list[str], reference: torch.Tensor | None = None, size: tuple | None = None):
        """[negative; positive] Qwen3 embeddings (2B, S, 3 D) with their position ids, and the reference's
        tokens (1, h*w, 128) and ids (h*w, 4), or None. The same at every image size."""
        n = len(texts)
        emb, txt_ids = self.pipe.encode_prompt(prompt=[""] * n + texts, device=self.device,
                                               max_sequence_length=self.args.max_text_tokens,
                                               text_encoder_out_layers=self.text_layers)
        ref = ref_ids = None
        # the reference (1, C, h, w) from encode_image is context, never trained; its tokens sit at time
        # coordinate 10, as the pipeline's image= argument puts them
        if reference is not None:
            ref = reference.detach().flatten(2).transpose(1, 2).to(self.dtype)
            ref_ids = self.pipe._prepare_image_ids([reference])[0].to(self.device)
        return emb, txt_ids[0], ref, ref_ids

    def velocity(self, x: torch.Tensor, sigma: float, cond: tuple,
                 guidance: float | None = None) -> torch.Tensor:
        """v_theta(x_t, t, c [, reference]) with classifier-free guidance, in float32. x: (B, C, h, w)."""
        emb, txt_ids, ref, ref_ids = cond
        B, C, h, w = x.shape
        guided = self.guided(guidance)
        if not guided:  # the conditional half of each [negative; positive] pair
            emb = emb[B:]
        tokens = x.flatten(2).transpose(1, 2)  # (B, h*w, C)
        tokens = torch.cat([tokens, tokens]) if guided else tokens
        ids = self.pipe._prepare_latent_ids(x[:1])[0].to(x.device)  # (h*w, 4): (time 0, row, column, layer 0)
        if ref is not None:  # the reference's tokens follow the noisy ones, in every row of the batch
            tokens = torch.cat([tokens, ref.expand(len(tokens), -1, -1).to(tokens.dtype)], 1)
            ids = torch.cat([ids, ref_ids])
        # the pipeline's timestep: sigma * 1000 rounded to the latents' dtype, then / 1000
        t = torch.full((len(tokens),), float(sigma) * 1000, device=x.device).to(self.dtype) / 1000
        v = self.transformer(hidden_states=tokens.to(self.dtype), timestep=t, guidance=None,
                             encoder_hidden_states=emb, txt_ids=txt_ids, img_ids=ids, return_dict=False)[0]
        v = v[:, :h * w]  # (B or 2B, h*w, C): the reference's outputs are dropped
        v = self.cfg(v, guidance) if guided else v.float()
        return v.transpose(1, 2).reshape(B, C, h, w)

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> list:
        """Normalized latents (B, 128, h, w) -> un-standardize, unpatchify to (B, 32, 2h, 2w), VAE decode."""
        z = self.pipe._unpatchify_latents(x.float() * self.bn_std + self.bn_mean)
        return self.to_pil(self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0])

    @torch.no_grad()
    def encode_image(self, image: Image.Image, size: tuple | None = None) -> torch.Tensor:
        """PIL image -> normalized latents (1, 128, h, w), the posterior's mode. size None: as the pipeline's
        image= takes a reference, at the image's own aspect ratio and size (at most 1024^2 pixels, cropped to
        multiples of 16); size (H, W): resized to it, as the start of an SDEdit."""
        mode = "default"
        if size is None:
            if image.width * image.height > 1024 * 1024:
                image = self.pipe.image_processor._resize_to_target_area(image, 1024 * 1024)
            m = self.multiple
            size = (max(m, image.height // m * m), max(m, image.width // m * m))
            mode = "crop"
        z = self.vae.encode(self.pixels(image, size, mode).to(self.vae.dtype)).latent_dist.mode().float()
        return (self.pipe._patchify_latents(z) - self.bn_mean) / self.bn_std


class SD3Renderer(Renderer):
    """Stable Diffusion 3(.5): CLIP-L + CLIP-G + T5 text encoders, an MMDiT on 2x2-patched latents. It cannot
    take a reference image, so SRR refines it by SDEdit (`sdedit_start`)."""

    # joint attention (Flow-GRPO)
    lora_targets = "to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out"

    def __init__(self, pipe, device, args: Args):
        super().__init__(pipe, device, args)
        self.scale = self.pipe.vae_scale_factor
        self.multiple = self.scale * self.transformer.config.patch_size  # latents are patchified 2x2
        self.latent_channels = self.transformer.config.in_channels

    def sigmas(self, num_steps: int, size: tuple | None = None) -> torch.Tensor:
        """The scheduler's shifted sigmas (T+1,), from 1 to 0 (SD3.5: shift 3, whatever the size)."""
        self.scheduler.set_timesteps(num_steps, device="cpu")
        return self.scheduler.sigmas.float().cpu()

    @torch.no_grad()
    def encode(self, texts: list[str], reference: torch.Tensor | None = None, size: tuple | None = None):
        """Text conditioning with the frozen CLIP-L, CLIP-G and T5 encoders; [negative; positive] for CFG (the
        same at every image size)."""
        if reference is not None:
            raise ValueError("Stable Diffusion 3 cannot take a reference image: refine with "
                             "--srr-refine sdedit")
        emb, neg, pooled, neg_pooled = self.pipe.encode_prompt(
            prompt=texts, prompt_2=None, prompt_3=None, device=self.device, do_classifier_free_guidance=True,
            negative_prompt=[""] * len(texts), max_sequence_length=self.args.max_text_tokens)
        return torch.cat([neg, emb]), torch.cat([neg_pooled, pooled])

    def velocity(self, x: torch.Tensor, sigma: float, cond: tuple,
                 guidance: float | None = None) -> torch.Tensor:
        """v_theta(x_t, t, c) with classifier-free guidance (when `guided`), in float32. x: (B, C, h, w)."""
        emb, pooled = cond
        guided = self.guided(guidance)
        if not guided:  # the conditional half of each [negative; positive] pair
            emb = emb[len(x):]
            pooled = pooled[len(x):]
        x_in = (torch.cat([x, x]) if guided else x).to(self.dtype)
        t = torch.full((len(x_in),), float(sigma) * self.scheduler.config.num_train_timesteps,
                       device=x.device)
        # t in fp32, as diffusers
        v = self.transformer(hidden_states=x_in, timestep=t, encoder_hidden_states=emb,
                             pooled_projections=pooled, return_dict=False)[0]
        return self.cfg(v, guidance) if guided else v.float()

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> list:
        """Latents (B, C, h, w) -> PIL images."""
        cfg = self.vae.config
        return self.to_pil(self.vae.decode((x / cfg.scaling_factor + cfg.shift_factor).to(self.vae.dtype),
                                           return_dict=False)[0])

    @torch.no_grad()
    def encode_image(self, image: Image.Image, size: tuple | None = None) -> torch.Tensor:
        """PIL image -> latents (1, C, h, w) at size (H, W) (None: the --resolution square), deterministic
        (the posterior's mode): the start of an SDEdit."""
        size = size or (self.args.resolution, self.args.resolution)
        z = self.vae.encode(self.pixels(image, size).to(self.vae.dtype)).latent_dist.mode().float()
        return (z - self.vae.config.shift_factor) * self.vae.config.scaling_factor


# --------------------------------------------------------------------------------------------------
# The reward client: DVReward over HTTP, scored in background threads (Sec. 4.3), retries and fail-over
# --------------------------------------------------------------------------------------------------


class RewardError(RuntimeError):
    """The reward server could not score a batch (down, or it rejected the request)."""


class RewardClient:
    """Scores images on the DVReward server(s) in background threads: submit() returns a Future, so the
    next group is sampled while the last is scored (Sec. 4.3, "asynchronously calling the reward model")."""

    def __init__(self, urls: str, token: str = "", patience: float = 300.0, max_body: int = 32 << 20):
        self.urls = [u.strip().rstrip("/") for u in urls.split(",") if u.strip()]
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.patience = patience
        self.max_body = max_body
        self.calls = 0
        self.closed = False
        self.pool = ThreadPoolExecutor(max_workers=4 * len(self.urls))
        # one requests.Session per worker thread (a Session is not thread-safe)
        self.local = threading.local()

    def close(self):
        """Stop: queued requests are cancelled and running ones stop retrying."""
        self.closed = True
        self.pool.shutdown(wait=False, cancel_futures=True)

    def submit(self, images: list, semantic: list, quality: list) -> Future:
        """images: PIL list; semantic / quality: one list of question strings per image."""
        first = self.calls % len(self.urls)  # spread requests over the servers
        self.calls += 1
        return self.pool.submit(self._score, first, images, semantic, quality)

    def _score(self, first: int, images, semantic, quality) -> dict:
        # PNG with fast compression: lossless, and cheap next to the verifier's forward pass
        encoded = []
        for im in images:
            buf = io.BytesIO()
            im.save(buf, format="PNG", compress_level=1)
            encoded.append(base64.b64encode(buf.getvalue()).decode())
        out = {"rewards": [], "semantic_scores": [], "quality_scores": []}
        start = 0
        while start < len(encoded):  # chunks under the server's body limit
            end, size = start, 0
            while end < len(encoded) and (end == start or size + len(encoded[end]) < self.max_body // 2):
                size += len(encoded[end])
                end += 1
            body = {"images": encoded[start:end], "semantic_questions": semantic[start:end],
                    "quality_questions": quality[start:end]}
            part = self._post(first, body)
            for k in out:
                out[k] += part[k]
            start = end
        return out

    def session(self) -> requests.Session:
        """This worker thread's Session: its connections stay open between requests, so a step's requests do
        not each open a new one (many trainer processes doing that at once can fill the server's queue)."""
        if not hasattr(self.local, "session"):
            self.local.session = requests.Session()
        return self.local.session

    def _post(self, first: int, body: dict) -> dict:
        """POST /score; a server that is down or failing is retried (the next URL first) with exponential
        backoff for up to `patience` seconds, then the run stops with a clear error: never zero rewards."""
        delay = 1.0
        deadline = time.monotonic() + self.patience
        attempt = 0
        while True:
            url = self.urls[(first + attempt) % len(self.urls)]
            try:
                r = self.session().post(f"{url}/score", json=body, headers=self.headers, timeout=600)
            except requests.ConnectionError as e:
                problem = f"cannot connect ({type(e).__name__})"
            else:
                if r.status_code == 200:
                    return r.json()
                try:
                    problem = f"HTTP {r.status_code}: {r.json().get('error', r.text[:200])}"
                except ValueError:
                    problem = f"HTTP {r.status_code}: {r.text[:200]}"
                if r.status_code < 500:  # our request is wrong: retrying will not help
                    raise RewardError(f"reward server {url} rejected the request: {problem}")
            attempt += 1
            if self.closed or time.monotonic() + delay > deadline:
                raise RewardError(f"reward server {url}: {problem}; gave up after {attempt} tries in "
                                  f"{self.patience:.0f} s (--reward-patience)")
            print(f"reward server {url}: {problem}; retrying in {delay:.0f} s", file=sys.stderr)
            time.sleep(delay)
            delay = min(delay * 2, 30.0)


def start_reward_server(verifier: str = "toy", device: str = "auto") -> tuple[subprocess.Popen, str]:
    """Start `reward_server.py --verifier <verifier>` on a free localhost port; returns (process, url)."""
    server = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reward_server.py")
    command = [sys.executable, server, "--verifier", verifier, "--device", device, "--port", "0",
               "--exit-with-parent"]
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # "reward server listening on http://127.0.0.1:PORT"
    if "listening on" not in line:
        proc.kill()
        raise RewardError(f"the {verifier} reward server did not start (it printed {line!r})")
    return proc, line.split("listening on", 1)[1].strip()


def connect_reward_server(args: Args) -> tuple[subprocess.Popen | None, RewardClient]:
    """The client of --reward-url; without one (the toy preset), first start a toy reward server here. Returns
    (the server process or None, the client)."""
    server = None
    if not args.reward_url:
        server, args.reward_url = start_reward_server()
    token = args.reward_token or os.environ.get("ALPHAGRPO_REWARD_TOKEN", "")
    return server, RewardClient(args.reward_url, token, args.reward_patience)


# --------------------------------------------------------------------------------------------------
# Prompts with DVReward questions: reading and checking prompts.jsonl (Sec. 4.3)
# --------------------------------------------------------------------------------------------------


def normalize_row(row, where: str) -> dict:
    """Validate one prompt row; accept our schema and the official AlphaGRPO one (question lists of strings
    or of {"question": ..., "tag": ...} dicts). Raises ValueError naming `where` and the reason."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
        raise ValueError(f"{where}: 'prompt' is missing or empty" if not row.get("prompt") else
                         f"{where}: 'prompt' must be a string")
    out = {"prompt": row["prompt"].strip()}
    for key, tags in (("semantic_questions", SEMANTIC_TAGS), ("quality_questions", QUALITY_TAGS)):
        qs = row.get(key, [] if key == "quality_questions" else None)
        if not isinstance(qs, list):
            raise ValueError(f"{where}: '{key}' is missing or not a list")
        norm = []
        for j, q in enumerate(qs):
            q = {"question": q, "tag": None} if isinstance(q, str) else q
            if not isinstance(q, dict) or not isinstance(q.get("question"), str) or not q["question"].strip():
                raise ValueError(f"{where}: {key}[{j}] must be a non-empty string or a {{'question': str}} "
                                 "object")
            tag = q.get("tag")
            if tag is not None and tag not in tags:
                raise ValueError(f"{where}: {key}[{j}] has unknown tag {tag!r} (allowed: {', '.join(tags)})")
            norm.append({"question": q["question"].strip(), "tag": tag})
        out[key] = norm
    if not out["semantic_questions"]:
        raise ValueError(f"{where}: no semantic question (DVReward needs at least one)")
    for key in ("split", "task", "difficulty", "kind"):
        if key in row and not isinstance(row[key], str):
            raise ValueError(f"{where}: '{key}' must be a string")
        out[key] = row.get(key)
    target = row.get("target")
    if target is not None and not (isinstance(target, dict) and all(isinstance(target.get(k), str)
                                                                     for k in ("colour", "region"))):
        raise ValueError(f"{where}: 'target' must be {{'colour': str, 'region': str}} (toy-world rows)")
    out["target"] = target
    return out


def load_prompts(path: str, split: str | None = "train") -> list[dict]:
    """Read a prompts.jsonl and validate every row (line numbers in errors). split=None keeps all rows."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such prompt file (--prompts)")
    rows = [normalize_row(row, f"{path}:{n}") for n, row in read_jsonl(path)]
    rows = [row for row in rows if split is None or row["split"] in (split, None)]
    if not rows:
        raise ValueError(f"{path}: no prompt rows" + (f" with split {split!r}" if split else ""))
    return rows


# --------------------------------------------------------------------------------------------------
# Run plumbing: resume, several processes, pictures
# --------------------------------------------------------------------------------------------------


def prompt_rows(args: Args, split: str | None) -> list:
    """The prompt set's rows of `split` (None: all): the toy world's, or --prompts' (load_prompts checks)."""
    if args.preset == "toy" and not args.prompts:
        return [r for r in TOY_WORLD_PROMPTS if split is None or r["split"] == split]
    return load_prompts(args.prompts, split)


def prompt_for(rows: list, position: int, seed: int) -> dict:
    """The prompt at a data position: epochs over the rows, each in its own seeded order."""
    epoch, i = divmod(position, len(rows))
    order = list(range(len(rows)))
    random.Random(seed * 7919 + epoch).shuffle(order)
    return rows[order[i]]


def prepare_run(args: Args, rank: int, world: int, check_renderer: bool = True) -> tuple[str, list, list]:
    """The run's folder and its train and test prompt rows, after every check that needs no model: the data
    first (a malformed row fails before any model loads), a folder that already holds a run, a missing
    --reward-url, and (check_renderer) the renderer's kind. Creates the folder.
    Returns (out, rows, eval_rows)."""
    if args.groups_per_step % world:
        raise ValueError(f"--groups-per-step {args.groups_per_step} must be a multiple of the "
                         f"{world} processes")
    n_srr = round(args.mix_ratio * args.groups_per_step)
    if args.task == "mix" and args.srr_init == "rt2i" and n_srr % world:
        raise ValueError(f"--task mix: SRR group k refines RT2I group k + {n_srr}, which must be on the same "
                         f"process: the {n_srr} SRR groups must be a multiple of the {world} processes")
    # --resume takes a run folder or one of its checkpoints, .../checkpoints/step_N
    resumed_run = args.resume
    if args.resume and os.path.exists(os.path.join(args.resume, "state.json")):
        resumed_run = os.path.dirname(os.path.dirname(os.path.abspath(args.resume)))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or resumed_run or os.path.join("runs", f"{args.preset}-{args.task}-{stamp}")
    if rank == 0 and not args.resume and os.path.exists(os.path.join(out, "metrics.jsonl")):
        raise ValueError(f"{out} already holds a run (metrics.jsonl): pass --resume {out} or another --out")
    rows, eval_rows = prompt_rows(args, "train"), prompt_rows(args, "test")
    if not (args.dry_run or args.reward_url or args.preset == "toy"):
        raise ValueError("--reward-url is required: start `python reward_server.py --verifier <model>` first")
    if check_renderer:
        check_models(args, out)
    os.makedirs(out, exist_ok=True)
    return out, rows, eval_rows


def record_run(args: Args, out: str, start: int, world: int, models: str = ""):
    """OUT/args.json with the code's git commit and the models' classes; on resume, metrics.jsonl keeps the
    rows before `start`."""
    keep_metrics_before(os.path.join(out, "metrics.jsonl"), start)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    with open(os.path.join(out, "args.json"), "w") as f:
        json.dump({**dataclasses.asdict(args), "git_commit": commit, "world_size": world, "models": models},
                  f, indent=1)


def log_step(step: int, groups: list, stats: list, zero_std_frac: float, timers: dict, evaluation: dict,
             tags: list, args: Args, out: str, rank: int = 0, world: int = 1):
    """Gather the step's numbers from every rank; rank 0 appends the metrics row, prints a line per evaluation
    (so the console shows the run learning), and draws the sample grid and the curves."""
    summaries = [summarize(g) for g in groups]
    local = {"summaries": summaries, "stats": stats, "zero": zero_std_frac, "timers": timers}
    everyone = [local]
    if world > 1:
        everyone = [None] * world
        torch.distributed.all_gather_object(everyone, local)
    if rank != 0:
        return
    row = metrics_row(step, [s for e in everyone for s in e["summaries"]],
                      [s for e in everyone for s in e["stats"]],
                      sum(e["zero"] for e in everyone) / world, everyone[0]["timers"], tags, args)
    row.update(evaluation)
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
    if evaluation:
        print_evaluation(row)
    last = step == args.steps - 1
    if args.sample_every and (step % args.sample_every == 0 or last):
        grid_rows = [(f"{g.task}: {g.row['prompt']}", group_tiles(g)) for g in groups[:4]]
        save_grid(os.path.join(out, "samples", f"step_{step:06d}.png"), grid_rows,
                  cols=max(len(tiles) for _, tiles in grid_rows))
    if last or (args.sample_every and step % args.sample_every == 0):
        plot_curves(os.path.join(out, "metrics.jsonl"), os.path.join(out, "curves.png"))


def eval_grid(out: str, step: int) -> str:
    return os.path.join(out, "eval", f"step_{step:06d}.png")


def print_evaluation(row: dict):
    """A console line per evaluation, so the run shows itself learning."""
    shown = ("reward_mean", "eval_reward", "plan_accuracy_implicit", "eval_plan_accuracy_implicit",
             "eval_forced_plan")
    tqdm.write(f"step {row['step']}: " + ", ".join(f"{k} {row[k]:.3f}" for k in shown
                                                   if row.get(k) is not None))


def log_evaluation(step: int, evaluation: dict, args: Args, out: str, rank: int = 0):
    """The evaluation of the trained policy, after the last update: a row of its own at `step` = --steps,
    with every key of the step rows (null but the evaluation's), so that eval at step s always means the
    policy after s updates. A resumed run drops it (keep_metrics_before) and evaluates again at its start."""
    if rank != 0:
        return
    path = os.path.join(out, "metrics.jsonl")
    with open(path) as f:
        keys = json.loads(f.read().splitlines()[-1]).keys()
    row = {**{k: None for k in keys}, "step": step, **evaluation}
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    print_evaluation(row)
    plot_curves(path, os.path.join(out, "curves.png"))


def where_it_stopped(e: Exception, step: int, out: str) -> str:
    """The message of a run stopped at `step`: the cause, what is kept and how to continue."""
    folder = os.path.join(out, "checkpoints")
    saved = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    return (f"{e}. The run stopped at step {step}: metrics.jsonl holds every finished step; the last checkpoint "
            f"is {saved[-1] if saved else 'none yet'} (continue with --resume {out})")


def run_summary(out: str) -> str:
    """What a finished run shows, for the console: the first and the last 10 steps' means of the reward (and
    of the plan accuracy and the SRR keys where the run has them), the evaluation at its first and last step,
    and where the files are. The last step alone is one noisy batch."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    evaluated = [r for r in rows if r.get("eval_reward") is not None]
    rows = [r for r in rows if r.get("reward_mean") is not None]  # the steps (not the final evaluation's row)
    n = min(10, len(rows))
    lines = [f"done: {len(rows)} steps in {out}/metrics.jsonl; mean of the first {n} -> the last {n} steps:"]
    for key in ("reward_mean", "plan_accuracy_implicit", "improved_frac", "fpr_frac", "all_failed_frac",
                "skipped_frac"):
        first = mean_or_none([r.get(key) for r in rows[:n]])
        last = mean_or_none([r.get(key) for r in rows[-n:]])
        if first is not None and last is not None:
            lines.append(f"  {key:<28} {first:.3f} -> {last:.3f}")
    if evaluated:
        a, b = evaluated[0], evaluated[-1]
        lines.append(f"evaluation on the test prompts after {a['step']} -> {b['step']} updates:")
        for key in ("eval_reward", "eval_plan_accuracy", "eval_plan_accuracy_implicit", "eval_forced_plan",
                    "eval_forced_plan_implicit"):
            if a.get(key) is not None and b.get(key) is not None:
                lines.append(f"  {key:<28} {a[key]:.3f} -> {b[key]:.3f}")
    lines.append(f"curves: {out}/curves.png; samples: {out}/samples/; evaluation grids: {out}/eval/; "
                 f"checkpoints: {out}/checkpoints/")
    return "\n".join(lines)


def question_tags(rows: list) -> list:
    """The DVReward tags of a prompt set's questions, sorted: the metrics' score_<tag> keys."""
    return sorted({q["tag"] for r in rows for k in ("semantic_questions", "quality_questions")
                   for q in r[k] if q["tag"]})


def question_row(args: Args, prompt: str, question: list) -> dict | None:
    """`sample`'s DVReward questions: --question if given, else the prompt's row in the prompt set."""
    if question:
        return {"prompt": prompt, "semantic_questions": [{"question": q, "tag": None} for q in question],
                "quality_questions": []}
    return next((r for r in prompt_rows(args, None) if r["prompt"] == prompt), None)


def wants_refinement(gate: str, scores: dict | None, i: int = 0) -> bool:
    """The verifier gate (--refine-below): refine an image only where its DVReward (Sec. 4.2) finds a flaw,
    and keep the others unchanged, since a reflection told that an image "contains mistakes" also changes
    what was right (README). gate: '' refines every image; a number TAU, an image whose reward R < TAU;
    'question', an image where any question's confidence P(yes) < 0.5. scores: the reward server's answer,
    for image i."""
    if not gate:
        return True
    if gate == "question":
        return least_confidence(scores, i) < 0.5
    return scores["rewards"][i] < float(gate)


def least_confidence(scores: dict, i: int = 0) -> float:
    """The lowest confidence P(yes) among image i's questions (Sec. 4.2), semantic and quality; 1 if none."""
    return min(scores["semantic_scores"][i] + scores["quality_scores"][i], default=1.0)


@torch.no_grad()
def sample(args: Args, prompt: str = "", refine_rounds: int = 0, checkpoint: str = "", question: list = (),
           test_prompts: bool = False, refine_below: str = ""):
    """Draw `prompt` with reasoning (ODE sampler), then `refine_rounds` rounds of reflect-and-refine; with the
    verifier gate (`refine_below`, `wants_refinement`) a round keeps an image that passes it unchanged. Writes
    each round's image, text and reward (when questions are known: --question, or the prompt's row in the
    prompt set) and a side-by-side PNG. `test_prompts`: every test prompt of the prompt set instead, each in
    its own folder, then the rewards per round and what each round did (`rounds_summary`)."""
    out = args.out or os.path.join("runs", f"sample-{time.strftime('%Y%m%d-%H%M%S')}")
    check_models(args, out)
    prompts = [r["prompt"] for r in prompt_rows(args, "test")] if test_prompts else [prompt]
    rows = [question_row(args, p, question) for p in prompts]  # the DVReward questions of each, or None
    scoring = any(rows) and bool(args.reward_url or args.preset == "toy")
    if refine_below and not (all(rows) and scoring):
        raise ValueError("--refine-below gates on the prompt's DVReward: it needs its questions (--question, "
                         "or the prompt in --prompts) and a reward server (--reward-url)")
    os.makedirs(out, exist_ok=True)
    policy = load_policy(args, out)
    if checkpoint:
        load_checkpoint(checkpoint, policy, None, args)
    server, client = connect_reward_server(args) if scoring else (None, None)
    results = []
    try:
        for i, (prompt, row) in enumerate(zip(prompts, rows)):
            folder = os.path.join(out, f"{i:03d}") if test_prompts else out
            os.makedirs(folder, exist_ok=True)
            gen = seed_torch_and_group_rng(args, 0, 0)  # each prompt drawn as a lone `sample` draws it
            rounds = []
            scores = None
            for k in range(refine_rounds + 1):
                refined = None if k == 0 else wants_refinement(refine_below, scores)
                if k == 0:  # round 0 plans, then draws
                    image, text = draw(policy, args, prompt, gen)
                elif refined:  # later rounds reflect on the last image, then redraw it
                    image, text = refine(policy, args, prompt, image, gen)
                else:  # the gate passed it: the same image (and the same file), scored as it was
                    text = ""
                    shutil.copyfile(*(os.path.join(folder, f"round_{r}.png") for r in (k - 1, k)))
                if client is not None and row is not None and refined is not False:
                    sem, qual = questions(row)
                    scores = client.submit([image], [sem], [qual]).result()
                reward = scores and scores["rewards"][0]
                if refined is not False:
                    image.save(os.path.join(folder, f"round_{k}.png"))
                # the least confident question: an image the gate 'question' passes has it >= 0.5
                least = scores and least_confidence(scores)
                rounds.append({"round": k, "text": text, "reward": reward, "least_confidence": least,
                               "refined": refined, "image": f"round_{k}.png"})
                what = "drawn" if k == 0 else "refined" if refined else "kept (it passes the gate)"
                print(f"round {k}: {what}, reward {reward if reward is None else round(reward, 4)} | {text}")
            save_rounds(folder, prompt, rounds)
            results.append((row, rounds))
    finally:
        if client is not None:
            client.close()
        if server is not None:
            server.terminate()
    if test_prompts:
        rounds_summary(out, results)
    return out


def rounds_summary(out: str, results: list, margin: float = 0.05) -> dict:
    """`sample --test-prompts`: per kind of prompt (the toy's explicit / implicit, else "all"), the mean
    reward of each round and the shares of prompts whose round k scored more than `margin` below (worse) or
    above (better) their round 0; then, over all prompts, what each round k did: the shares it refined and
    kept, made better and worse than the image it refined, and the share of right images (round 0 passes
    every question, P(yes) >= 0.5) that it left worse than round 0. results: [(row, rounds)]. Prints two
    tables; writes OUT/rounds_summary.json."""
    scored = [(row, rounds) for row, rounds in results if row is not None and rounds[0]["reward"] is not None]
    if not scored:
        print("no rewards: the prompts have no DVReward questions here")
        return {}
    kinds = sorted({row.get("kind", "all") for row, _ in scored})
    groups = {k: [[r["reward"] for r in rounds] for row, rounds in scored if row.get("kind", "all") == k]
              for k in kinds}
    if len(kinds) > 1:
        groups["all"] = [[r["reward"] for r in rounds] for _, rounds in scored]
    n = len(scored[0][1])
    share = lambda xs, hit: round(sum(map(hit, xs)) / len(xs), 4) if xs else None  # noqa: E731
    summary = {kind: {"prompts": len(rs), "reward": [share(rs, lambda r: r[k]) for k in range(n)],
                      "worse": [share(rs, lambda r: r[k] < r[0] - margin) for k in range(1, n)],
                      "better": [share(rs, lambda r: r[k] > r[0] + margin) for k in range(1, n)]}
               for kind, rs in groups.items()}
    rounds = [r for _, r in scored]
    right = [r for r in rounds if r[0]["least_confidence"] >= 0.5]
    summary["rounds"] = [{
        "round": k, "refined": share(rounds, lambda r: bool(r[k]["refined"])),
        "kept": share(rounds, lambda r: not r[k]["refined"]),
        "better": share(rounds, lambda r: r[k]["refined"] and r[k]["reward"] > r[k - 1]["reward"] + margin),
        "worse": share(rounds, lambda r: r[k]["refined"] and r[k]["reward"] < r[k - 1]["reward"] - margin),
        "right": len(right), "right_made_worse": share(right, lambda r: r[k]["reward"] < r[0]["reward"] - margin),
    } for k in range(1, n)]
    head = ["prompts"] + [f"round {k}" for k in range(n)] + [f"worse / better after {k}" for k in range(1, n)]
    print("| " + " | ".join(head) + " |\n" + "|---" * len(head) + "|")
    for kind, v in summary.items():
        if kind != "rounds":
            cells = [f"{x:.3f}" for x in v["reward"]]
            cells += [f"{w:.2f} / {b:.2f}" for w, b in zip(v["worse"], v["better"])]
            print(f"| {kind} ({v['prompts']}) | " + " | ".join(cells) + " |")
    print(f"\n| round | refined | kept | better / worse than the image it refined | right images (round 0) "
          f"made worse |\n|---|---|---|---|---|")
    for r in summary["rounds"]:
        worse = "-" if r["right_made_worse"] is None else f"{r['right_made_worse']:.2f}"
        print(f"| {r['round']} | {r['refined']:.2f} | {r['kept']:.2f} | {r['better']:.2f} / {r['worse']:.2f} | "
              f"{worse} (of {r['right']}) |")
    with open(os.path.join(out, "rounds_summary.json"), "w") as f:
        json.dump({"margin": margin, **summary}, f, indent=1)
    return summary


def save_rounds(out: str, prompt: str, rounds: list):
    """`sample`'s record: OUT/rounds.json and OUT/side_by_side.png beside the rounds' PNGs."""
    with open(os.path.join(out, "rounds.json"), "w") as f:
        json.dump({"prompt": prompt, "rounds": rounds}, f, indent=1)
    tiles = []
    for r in rounds:
        label = f"round {r['round']}" + (f"  R {r['reward']:.2f}" if r["reward"] is not None else "")
        tiles.append((Image.open(os.path.join(out, r["image"])), label, r["text"]))
    save_grid(os.path.join(out, "side_by_side.png"), [(prompt, tiles)], cols=len(rounds))
    print(f"wrote {out}/side_by_side.png")


def keep_metrics_before(path: str, step: int):
    """On resume, drop metric rows at or after the checkpoint's step (a killed run may have written some)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        rows = [line for line in f if line.strip() and json.loads(line)["step"] < step]
    with open(path + ".tmp", "w") as f:
        f.writelines(rows)
    os.replace(path + ".tmp", path)


def setup_distributed():
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: one process per GPU (gloo on CPU). Returns
    (rank, world, device)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1, None
    cuda = torch.cuda.is_available()
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local)
    return torch.distributed.get_rank(), world, torch.device(f"cuda:{local}" if cuda else "cpu")


def save_grid(path: str, rows: list, cols: int):
    """A PNG that reads alone: rows of (title, tiles), the title (the prompt) above its tiles, each tile an
    (image, label, text) with the reward and the reasoning (SRR: the reflection) under the image. A row of
    fewer than `cols` tiles may share a line with the next (the evaluation's one-image rows); a longer one
    wraps."""
    cell, band = 128, 36  # tile side; the height of the title band and of the text under a tile
    lines = [[]]  # lines of (first column, title, tiles)
    for title, tiles in rows:
        for i in range(0, len(tiles), cols):
            chunk = tiles[i:i + cols]
            used = sum(len(t) for _, _, t in lines[-1])
            if used + len(chunk) > cols:
                lines.append([])
                used = 0
            lines[-1].append((used, title if i == 0 else "", chunk))
    height = cell + 2 * band
    grid = Image.new("RGB", (cols * cell, len(lines) * height), "white")
    draw = ImageDraw.Draw(grid)
    for n, line in enumerate(lines):
        y0 = n * height
        for col, title, tiles in line:
            x0 = col * cell
            # the title wrapped to the row's width, about 6 px a character; a third line would not fit
            wrapped = textwrap.wrap(title, max(1, len(tiles) * cell // 6 - 1)) or [""]
            wrapped = wrapped[:2] if len(wrapped) <= 2 else [wrapped[0], wrapped[1][:-3] + "..."]
            for k, s in enumerate(wrapped):
                draw.text((x0 + 2, y0 + 2 + 14 * k), s, fill="navy")
            for j, (im, label, text) in enumerate(tiles):
                x = x0 + j * cell
                grid.paste(im.resize((cell, cell), Image.NEAREST), (x, y0 + band))
                under = [(label, "black"), (text[:20], "gray"), (text[20:40], "gray")]
                for k, (s, color) in enumerate(under):
                    draw.text((x + 2, y0 + band + cell + 1 + 11 * k), s, fill=color)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    grid.save(path)


def group_tiles(g: Group, n: int = 6) -> list:
    """One grid row: SRR shows the initial image first, then the refinements beside it."""
    init = [(g.init_image, f"initial {g.init_reward:.2f}", "")] if g.init_image is not None else []
    return init + [(im, f"R {float(r):.2f}", y) for im,
                   r, y in zip(g.image.images[:n], g.rewards, g.text.texts)]


def plot_curves(metrics: str, path: str):
    """OUT/curves.png from metrics.jsonl, drawn with PIL: the rewards and plan accuracies (0 to 1) over the
    steps, and under them the clip fractions (on their own scale). Series that are all null are left out."""
    with open(metrics) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    panels = [("reward and plan accuracy",
               ("reward_mean", "eval_reward", "plan_accuracy", "plan_accuracy_implicit",
                "eval_plan_accuracy_implicit", "eval_forced_plan", "eval_forced_plan_implicit"), 1.0),
              ("clip fractions", ("text_clipfrac", "image_clipfrac"), None)]
    palette = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
               (227, 119, 194)]
    W, H = 720, 240  # one panel
    image = Image.new("RGB", (W, H * len(panels)), "white")
    d = ImageDraw.Draw(image)
    s0 = min(r["step"] for r in rows)
    s1 = max(max(r["step"] for r in rows), s0 + 1)
    for p, (title, keys, top) in enumerate(panels):
        series = {k: [(r["step"], r[k]) for r in rows if r.get(k) is not None] for k in keys}
        series = {k: v for k, v in series.items() if v}
        top = top or 1.1 * max([y for v in series.values() for _, y in v] + [1e-3])
        x0, y0, x1, y1 = 56, p * H + 24, W - 190, (p + 1) * H - 28  # the plot's box
        d.rectangle((x0, y0, x1, y1), outline="black")
        d.text((x0, y0 - 16), title, fill="black")
        for frac in (0.0, 0.5, 1.0):
            y = y1 - frac * (y1 - y0)
            d.line((x0 - 4, y, x0, y), fill="black")
            d.text((4, y - 6), f"{frac * top:.3g}", fill="black")
        d.text((x0, y1 + 6), f"step {s0}", fill="black")
        d.text((x1 - 60, y1 + 6), f"step {s1}", fill="black")
        for i, (k, pts) in enumerate(series.items()):
            colour = palette[keys.index(k)]
            xy = [(x0 + (s - s0) / (s1 - s0) * (x1 - x0),
                   y1 - min(max(v / top, 0), 1) * (y1 - y0)) for s, v in pts]
            if len(xy) > 1:
                d.line(xy, fill=colour, width=2)
            for x, y in xy[:: max(1, len(xy) // 40)]:  # dots: sparse series (evaluation) stay visible
                d.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
            d.text((x1 + 10, y0 + 16 * i), k, fill=colour)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    image.save(path)


# --------------------------------------------------------------------------------------------------
# Metrics: one JSON row per step, and the evaluation on the test prompts
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(policy: Policy, rows: list, args: Args, client, path: str, rank=0, world=1):
    """Render the test prompts with reasoning and the ODE sampler at fixed seeds; the mean DVReward over
    all of them (gathered from every rank) and a PNG grid. Returns {eval_reward, eval_plan_accuracy (toy
    targets, else None), eval_plan_accuracy_implicit}."""
    tiles = []
    futures = []
    plans = []
    for k in range(rank, len(rows), world):
        gen = seed_torch_and_group_rng(args, -1, k)  # the same seeds at every evaluation
        image, plan = draw(policy, args, rows[k]["prompt"], gen)
        sem, qual = questions(rows[k])
        futures.append(client.submit([image], [sem], [qual]))  # scored while the next prompt is drawn
        tiles.append((image, rows[k]["prompt"]))
        plans.append((plan, rows[k].get("target"), rows[k].get("kind")))
    forced = forced_plan(policy, {k: rows[k] for k in range(rank, len(rows), world)}, args, client)
    rewards = [f.result()["rewards"][0] for f in futures]
    # one row per prompt: the prompt above its image, the reward and the plan under it
    tiles = [(prompt, [(im, f"R {r:.2f}", plan)])
             for (im, prompt), (plan, _, _), r in zip(tiles, plans, rewards)]
    forced = [(kind, f.result()["rewards"][0]) for kind, f in forced]
    if world > 1:
        everyone = [None] * world
        torch.distributed.all_gather_object(everyone, (rewards, plans, forced))
        rewards, plans, forced = (sum((e[i] for e in everyone), []) for i in range(3))
    if rank == 0:
        save_grid(path, tiles[:64], cols=8)
    implicit = [(y, t) for y, t, kind in plans if kind == "implicit"]
    return {"eval_reward": sum(rewards) / len(rewards),
            "eval_plan_accuracy": plan_accuracy([y for y, _, _ in plans], [t for _, t, _ in plans]),
            "eval_plan_accuracy_implicit": plan_accuracy([y for y, _ in implicit], [t for _, t in implicit]),
            "eval_forced_plan": mean_or_none([r for _, r in forced]),
            "eval_forced_plan_implicit": mean_or_none([r for kind, r in forced if kind == "implicit"])}


@torch.no_grad()
def forced_plan(policy: Policy, rows: list, args: Args, client) -> list:
    """The forced-plan probe (toy world): does the generator still draw the right plan when it is given it?
    Each test prompt with a target is drawn once with the plan that names it ("green bottom") in place of the
    reasoner's, by the ODE sampler at fixed noise, all in one batch. In one network the plan's updates move
    what the generator reads; this shows that drift apart from the plans' own accuracy (README). Returns
    [(row kind, reward future)] (empty without targets). rows: {k: row}; row k's noise is seeded by k."""
    pairs = [(k, r) for k, r in rows.items() if r.get("target")]
    if not pairs:
        return []
    seeds, rows = zip(*pairs)
    renderer = policy.renderer
    texts = [renderer_text(r["prompt"], toy_plan(r["target"])) for r in rows]
    x_T = torch.cat([renderer.noise(1, torch.Generator().manual_seed(k)) for k in seeds])
    sigmas = renderer.sigmas(args.eval_num_steps)
    images = renderer.decode(render(renderer, renderer.encode(texts), x_T, sigmas, range(0), 0.0)[0])
    return [(r["kind"], client.submit([im], *([q] for q in questions(r)))) for r, im in zip(rows, images)]


def plan_names_target(text: str, target: dict) -> bool:
    """A reasoning text names a toy target when the only colour it names is the target's colour and the only
    region it names is the target's region: "green bottom" names the green bottom half, "green red bottom"
    does not."""
    words = set(text.lower().replace(":", " ").replace(".", " ").replace(",", " ").split())
    colours = words & set(ToyVerifier.COLOURS)
    regions = words & set(TOY_REGIONS)
    return colours == {target["colour"]} and regions == {target["region"]}


def plan_accuracy(texts: list[str], targets: list) -> float | None:
    """The share of reasoning texts that name their row's target (`plan_names_target`), over the texts whose
    row has one; None when none has (prompt sets without toy targets)."""
    pairs = [(y, t) for y, t in zip(texts, targets) if t is not None]
    return sum(plan_names_target(y, t) for y, t in pairs) / len(pairs) if pairs else None


def summarize(g: Group) -> dict:
    """What the metrics need from a group, as plain numbers (so ranks can gather them)."""
    tags = {}
    for key, skey in (("semantic_questions", "semantic_scores"), ("quality_questions", "quality_scores")):
        for scores in g.scores[skey]:
            for q, s in zip(g.row[key], scores):
                tags.setdefault(q["tag"], []).append(s)
    return {"task": g.task, "rewards": g.rewards.tolist(), "init_reward": g.init_reward, "skip": g.skip,
            "failed": None if g.failed is None else g.failed.float().mean().item(),
            "all_failed": None if g.failed is None else bool(g.failed.all()),
            "text_len": g.text.mask.sum(1).float().mean().item(), "tags": tags, "kind": g.row.get("kind"),
            "plan_accuracy": plan_accuracy(g.text.texts, [g.row.get("target")] * len(g.text.texts))}


def mean_or_none(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else None


def metrics_row(step: int, summaries: list, stats: list, zero_std_frac: float, timers: dict, tags: list,
                args: Args) -> dict:
    """One JSON row per step; every row has every key (null where it does not apply, never NaN)."""
    R = torch.tensor([r for s in summaries for r in s["rewards"]])
    row = {"step": step, "reward_mean": R.mean().item(), "reward_std": R.std(unbiased=False).item(),
           "zero_std_frac": zero_std_frac,
           **{k: mean_or_none([st[k] for st in stats]) for k in
              ("text_loss", "image_loss", "text_clipfrac", "image_clipfrac", "text_kl", "image_kl")},
           **{f"time_{k}": timers[k] for k in ("reason", "render", "reward_wait", "train", "step")},
           "text_len": mean_or_none([s["text_len"] for s in summaries]), "eval_reward": None,
           # toy world: plans that name the target (null without targets), all prompts and the implicit ones
           "plan_accuracy": mean_or_none([s["plan_accuracy"] for s in summaries]),
           "plan_accuracy_implicit": mean_or_none([s["plan_accuracy"] for s in summaries
                                                   if s["kind"] == "implicit"]),
           "eval_plan_accuracy": None, "eval_plan_accuracy_implicit": None, "eval_forced_plan": None,
           "eval_forced_plan_implicit": None}
    for t in tags:
        row[f"score_{t}"] = mean_or_none([x for s in summaries for x in s["tags"].get(t, [])])
    if args.task != "rt2i":
        srr = [s for s in summaries if s["task"] == "srr"]
        row.update({
            "reward_init_mean": mean_or_none([s["init_reward"] for s in srr]),
            "reward_refined_mean": mean_or_none([sum(s["rewards"]) / len(s["rewards"]) for s in srr]),
            "improved_frac": mean_or_none([sum(r > s["init_reward"] for r in s["rewards"]) / len(s["rewards"])
                                           for s in srr]),
            "fpr_frac": mean_or_none([s["failed"] if args.fpr else 0.0 for s in srr]),
            # groups where no refinement improved: in the loss with advantage 0 (FPR), and those dropped
            # from it, all of a step's SRR groups when none of them improved (`skip_unimproved_step`)
            "all_failed_frac": mean_or_none([float(s["all_failed"]) for s in srr]),
            "skipped_frac": mean_or_none([float(s["skip"]) for s in srr])})
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


# --------------------------------------------------------------------------------------------------
# Checkpoints and LoRA export
# --------------------------------------------------------------------------------------------------


# Arguments that may change between a checkpoint and its resumption; any other difference is refused.
RESUMABLE = {"steps", "out", "resume", "reward_url", "reward_token", "reward_patience", "device",
             "sample_every", "save_every", "eval_every", "toy_cache"}


def lora_state(policy: Policy) -> dict:
    """A copy of both models' LoRA weights, keyed "reasoner.<parameter>" and "renderer.<parameter>"."""
    parts = (("reasoner", policy.reasoner.model), ("renderer", policy.renderer.transformer))
    return {f"{part}.{n}": p.detach().clone() for part, m in parts
            for n, p in m.named_parameters() if ".lora_" in n}


def load_lora_state(policy: Policy, state: dict):
    """Copy `state` (from lora_state) into both models' LoRA weights; refuse one that does not fit."""
    parts = (("reasoner", policy.reasoner.model), ("renderer", policy.renderer.transformer))
    own = {f"{part}.{n}": p for part, m in parts
           for n, p in m.named_parameters() if ".lora_" in n}
    if own.keys() != state.keys() or any(own[k].shape != state[k].shape for k in own):
        missing = sorted(own.keys() - state.keys())
        extra = sorted(state.keys() - own.keys())
        raise ValueError(f"the LoRA weights do not fit these models (missing {missing[:3]}, unexpected "
                         f"{extra[:3]}, or other shapes): were they made with other --lora-rank/targets?")
    with torch.no_grad():
        for k, p in own.items():
            p.copy_(state[k])


def file_sha256(path: str) -> str:

    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def save_checkpoint(policy: Policy, optimizer, args: Args, step: int, out: str) -> str:
    """OUT/checkpoints/step_N: LoRA weights, optimizer state, the next step, the arguments, file checksums,
    and the LoRA exported for diffusers and PEFT. Written to a temporary folder, then renamed (atomic)."""
    final = os.path.join(out, "checkpoints", f"step_{step:06d}")
    tmp = final + f".tmp{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    save_file(lora_state(policy), os.path.join(tmp, "lora.safetensors"))
    torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
    export_lora(policy, args, tmp)
    files = ["lora.safetensors", "optimizer.pt"]
    state = {"next_step": step, "args": dataclasses.asdict(args),
             "sha256": {f: file_sha256(os.path.join(tmp, f)) for f in files}}
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump(state, f, indent=1)
    if os.path.exists(final):

        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


# What the LoRA weights alone depend on (`sample --checkpoint` checks only these).
MODEL_ARGS = ("preset", "policy", "reasoner", "renderer", "lora_rank", "lora_alpha", "reasoner_lora_targets",
              "renderer_lora_targets")


def load_checkpoint(path: str, policy: Policy, optimizer, args: Args) -> int:
    """Restore a checkpoint (or the newest one in a run folder); refuse a partial, corrupt or foreign one
    with a message naming the problem. Without an optimizer (inference) only MODEL_ARGS must match.
    Returns the step to continue from."""
    if os.path.isdir(os.path.join(path, "checkpoints")):
        done = sorted(d for d in os.listdir(os.path.join(path, "checkpoints")) if ".tmp" not in d)
        if not done:
            raise ValueError(f"{path} holds no complete checkpoint")
        path = os.path.join(path, "checkpoints", done[-1])
    try:
        with open(os.path.join(path, "state.json")) as f:
            state = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a complete checkpoint: state.json unreadable ({e})") from None
    for name, digest in state["sha256"].items():
        if not os.path.exists(os.path.join(path, name)) or file_sha256(os.path.join(path, name)) != digest:
            raise ValueError(f"{path}: {name} is missing or corrupt (its checksum does not match state.json)")
    diff = {k: (v, getattr(args, k, None)) for k, v in state["args"].items() if getattr(args, k, None) != v
            and (k in MODEL_ARGS if optimizer is None else k not in RESUMABLE)}
    if diff:
        raise ValueError(f"{path} was made with another configuration: " +
                         ", ".join(f"{k}={a!r} there, {b!r} here" for k, (a, b) in sorted(diff.items())))
    load_lora_state(policy, load_file(os.path.join(path, "lora.safetensors"), device=str(policy.device)))
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), weights_only=True,
                                             map_location=policy.device))
    return state["next_step"]


def export_lora(policy: Policy, args: Args, folder: str):
    """The LoRA weights in the ecosystem's formats:
    - renderer/pytorch_lora_weights.safetensors, keys `transformer.<module>.lora_A.weight` / `lora_B.weight`,
      alpha / r folded into lora_B (without adapter metadata diffusers assumes alpha = r), for the renderer's
      pipeline: Flux2KleinPipeline.load_lora_weights or StableDiffusion3Pipeline.load_lora_weights;
    - reasoner/: a PEFT adapter (adapter_config.json + adapter_model.safetensors) for
      PeftModel.from_pretrained."""
    sd = {}
    for name, m in policy.renderer.transformer.named_modules():
        if isinstance(m, LoRALinear):
            sd[f"transformer.{name}.lora_A.weight"] = m.lora_A.weight.detach().float().contiguous()
            scaled_B = m.lora_B.weight.detach().float() * m.scale  # alpha / r folded in
            sd[f"transformer.{name}.lora_B.weight"] = scaled_B.contiguous()
    os.makedirs(os.path.join(folder, "renderer"), exist_ok=True)
    save_file(sd, os.path.join(folder, "renderer", "pytorch_lora_weights.safetensors"))
    sd = {f"base_model.model.{n}": p.detach().float().contiguous()
          for n, p in policy.reasoner.model.named_parameters() if ".lora_" in n}
    os.makedirs(os.path.join(folder, "reasoner"), exist_ok=True)
    save_file(sd, os.path.join(folder, "reasoner", "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": None, "r": args.lora_rank, "lora_alpha": args.lora_alpha,
              "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
              "base_model_name_or_path": args.reasoner,
              "target_modules": sorted({n.split(".")[-1] for n, m in policy.reasoner.model.named_modules()
                                        if isinstance(m, LoRALinear)}),
              "exclude_modules": r".*visual.*"}  # the vision tower's Linear layers carry no LoRA
    with open(os.path.join(folder, "reasoner", "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=1)


# --------------------------------------------------------------------------------------------------
# The toy world: targets, explicit and implicit prompts (README, "The toy world")
# --------------------------------------------------------------------------------------------------


# The toy world (README, "The toy world"): a target is a colour and a region, in the toy verifier's grammar
# ("Is the bottom half of the image green?"). Explicit prompts name the target. Implicit ones name a thing and
# where it is in other words ("grass fills the lower half"): that grass is green and that "lower" means bottom
# is the toy world knowledge below, which the reasoner must find by GRPO. Neither prior is shown it: the
# reasoner's (`toy_reasoner_prior`) restates explicit requests and guesses what a request leaves open, the
# renderer's (`toy_renderer_prior`) draws explicit captions and plans. Train and test prompts use other words.
# Four colours, none the complement of another: a toy image shows the rest in the complementary colour.
TOY_COLOURS = ("red", "green", "blue", "white")
TOY_REGIONS = ("top", "bottom")


TOY_EXPLICIT = {"train": ("the {region} half is {colour}", "{colour} in the {region} half",
                          "make the {region} half {colour}"),
                "test": ("paint the {region} half {colour}", "a {colour} {region} half")}


TOY_WORLD = {"grass": "green", "leaf": "green", "sky": "blue", "sea": "blue", "fire": "red", "tomato": "red",
             "snow": "white", "clouds": "white"}  # what colour a thing is


TOY_IMPLICIT = {  # where a thing is, in words that are not region names; the test recombines the same words
    "train": {"bottom": ("the {thing} fills the lower half", "{thing} below"),
              "top": ("the {thing} is above", "{thing} overhead")},
    "test": {"bottom": ("a {thing} in the lower half",), "top": ("a {thing} above",)}}


def toy_targets() -> list[dict]:
    """Every colour x region of the toy world (4 x 2): the priors learn this grammar, not the table."""
    return [{"colour": c, "region": r} for c in TOY_COLOURS for r in TOY_REGIONS]


def toy_plan(target: dict) -> str:
    """The plan that names a target: "green bottom"."""
    return f"{target['colour']} {target['region']}"


def toy_row(prompt: str, colour: str, region: str, kind: str, split: str) -> dict:
    return {"prompt": prompt,
            "semantic_questions": [{"question": f"Is the {region} half of the image {colour}?",
                                                      "tag": "Spatial"}], "quality_questions": [],
            "target": {"colour": colour, "region": region}, "kind": kind, "split": split}


# GRPO trains on the implicit prompts, where the reasoning carries the answer: every thing in every region in
# every train wording. The explicit requests, whose grammar the priors learnt (TOY_EXPLICIT["train"]), are
# test rows only: each target once, in the test wordings in turn.
TOY_WORLD_PROMPTS = [toy_row(TOY_EXPLICIT["test"][k % len(TOY_EXPLICIT["test"])].format(**t), t["colour"],
                             t["region"], "explicit", "test") for k, t in enumerate(toy_targets())] + [
    toy_row(words.format(thing=thing), colour, region, "implicit", split) for split in ("train", "test")
    for thing, colour in TOY_WORLD.items() for region in TOY_REGIONS for words in TOY_IMPLICIT[split][region]]


# --------------------------------------------------------------------------------------------------
# Toy models: the real classes at tiny sizes, saved with save_pretrained and loaded with from_pretrained
# --------------------------------------------------------------------------------------------------


# Model sizes. The toy preset and the real one build the same classes; only these numbers differ. The real
# ones are the published configs of Qwen3-VL-4B-Instruct and Stable Diffusion 3.5 medium (used by --dry-run;
# a test checks the parameter counts they give against the published ones).
SHAPES = {
    "toy": {
        "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=8, max_position_embeddings=4096),
        "vision": dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32,
                       num_position_embeddings=64, deepstack_visual_indexes=[0]),
        "transformer": dict(sample_size=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
                            joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=32,
                            pos_embed_max_size=8, dual_attention_layers=(0,)),
        # 4 blocks: the real 8x downsampling, so a 32 px image has 4x4 latents whose colours vary
        "vae": dict(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4, sample_size=32),
        "clip_l": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                       projection_dim=16),
        "clip_g": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                       projection_dim=16),
        "t5": dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8),
        # FLUX.2 klein at toy size: 1 double-stream + 2 single-stream blocks; a 4-layer Qwen3 read at 1-3
        "flux2_transformer": dict(num_layers=1, num_single_layers=2, attention_head_dim=8,
                                  num_attention_heads=4, timestep_guidance_channels=16, mlp_ratio=2.0,
                                  axes_dims_rope=(2, 2, 2, 2)),
        # 4 latent channels (patchified to 16); 4 blocks: the real 8x downsampling, so 32 px is 2x2 tokens
        "flux2_vae": dict(block_out_channels=(8, 8, 16, 16), layers_per_block=1, latent_channels=4,
                          norm_num_groups=4, sample_size=32),
        "qwen3": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=8, max_position_embeddings=1024),
        # Cosmos3's Wan 2.2-style VAE with 4 latent channels and two downsamplings (x the 2x2 input patchify:
        # 8x, where the real one is 16x), so that 32 px is 4x4 latents, 2x2 tokens, as the toy klein's
        "wan_vae": dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1,
                        temperal_downsample=[False, True], scale_factor_spatial=8),
        # The unified toy's heads: 32 dimensions, not 8. Cosmos3 rotates image rows and columns by the 2nd
        # and 3rd of a head's frequency pairs, text by all of them; with 4 pairs at base 5e6 rows turn 0.02
        # rad and the generator cannot tell top from bottom, at base 10 every pair turns with the text
        # position and it cannot find the words (measured, README). 16 pairs give rows 0.38 rad and leave
        # slow pairs for the words.
        "unified_text": dict(head_dim=32, rope_parameters=dict(
            rope_type="default", rope_theta=5e6, mrope_interleaved=True, mrope_section=[8, 4, 4])),
        # A Cosmos3-Edge-style reasoner at toy size: the unified toy's text shapes in Edge's form (relu2 MLP
        # without a gate, no q/k norm), a 2-layer SigLIP2 tower
        "edge_text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=32, max_position_embeddings=4096, rope_parameters=dict(
                              rope_type="default", rope_theta=5e6, mrope_section=[8, 4, 4])),
        "edge_vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    },
    "sd35": {
        "text": dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     max_position_embeddings=262144, tie_word_embeddings=True,
                     rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                                      "mrope_section": [24, 20, 20], "mrope_interleaved": True}),
        "vision": dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2560,
                       num_position_embeddings=2304, deepstack_visual_indexes=[5, 11, 17]),
        "transformer": dict(sample_size=128, num_layers=24, attention_head_dim=64, num_attention_heads=24,
                            joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
                            pos_embed_max_size=384, dual_attention_layers=tuple(range(13))),
        "vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
                    sample_size=1024),
        "clip_l": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu"),
        "clip_g": dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                       num_attention_heads=20, projection_dim=1280, hidden_act="gelu"),
        "t5": dict(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
                   feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                   relative_attention_max_distance=128),
    },
    # FLUX.2-klein-base-4B: the transformer's published config.json, Qwen3-4B as text encoder, FLUX.2's VAE
    "klein": {
        "flux2_transformer": dict(num_layers=5, num_single_layers=20, attention_head_dim=128,
                                  num_attention_heads=24, timestep_guidance_channels=256, mlp_ratio=3.0,
                                  axes_dims_rope=(32, 32, 32, 32)),
        "flux2_vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=32,
                          norm_num_groups=32, sample_size=1024),
        "qwen3": dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                      max_position_embeddings=40960, tie_word_embeddings=True, rope_theta=1e6),
    },
}


SHAPES["klein"].update(text=SHAPES["sd35"]["text"], vision=SHAPES["sd35"]["vision"])  # the same reasoner
# Cosmos3-Nano: its transformer's config.json (a Qwen3-VL-8B text stream, 36 layers of 4096, and a generation
# stream of the same shapes), Qwen3-VL-8B's vision tower, Wan 2.2's VAE (48 channels, 16x with the patchify)
SHAPES["cosmos3"] = {
    "text": dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                 num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                 rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                                  "mrope_interleaved": True}),
    "vision": dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                   num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24]),
    "wan_vae": dict(base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                    temperal_downsample=[False, True, True], scale_factor_spatial=16),
}
# Cosmos3-Edge: transformers' Cosmos3EdgeTextConfig defaults, which diffusers' Edge conversion builds the
# transformer from (28 layers of 2048, 16 / 8 heads of 128, relu2 MLP of 9216, rope base 1e8, vocabulary
# 131072), Cosmos3EdgeVisionConfig's SigLIP2 tower, the same Wan 2.2 VAE
SHAPES["cosmos3-edge"] = {
    "text": dict(vocab_size=131072, hidden_size=2048, intermediate_size=9216, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, hidden_act="relu2",
                 rms_norm_eps=1e-5, max_position_embeddings=131072,
                 rope_parameters={"rope_type": "default", "rope_theta": 1e8, "mrope_section": [24, 20, 20]}),
    "vision": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                   projector_hidden_size=11520),
    "wan_vae": SHAPES["cosmos3"]["wan_vae"],
}


def make_sd3(shapes: dict, seed: int = 0):
    """A random StableDiffusion3Pipeline of the given sizes, with SD3.5-medium's fixed fields (16 latent
    channels, VAE scaling/shift factors, no quant convs, qk RMS-norm, dual-attention layers, flow shift 3)
    and tokenizers built offline (character-level CLIP BPE, T5 unigram)."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config,
                              T5EncoderModel, T5Tokenizer)

    torch.manual_seed(seed)
    chars = sorted(ByteLevel.alphabet())
    clip_vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{c: i + 2 for i, c in enumerate(chars)},
                  **{c + "</w>": i + 2 + len(chars) for i, c in enumerate(chars)}}
    clip_tok = CLIPTokenizer(vocab=clip_vocab, merges=[], model_max_length=77)
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;?!'\"-"
    t5_vocab = ([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
                + [(c, -5.0) for c in letters] + [("\u2581" + c, -4.0) for c in letters])
    t5_tok = T5Tokenizer(vocab=t5_vocab, extra_ids=0, model_max_length=512)

    def clip(sizes, seed_offset):
        torch.manual_seed(seed + seed_offset)
        config = {"vocab_size": len(clip_vocab), "max_position_embeddings": 77, "bos_token_id": 0,
                  "eos_token_id": 1, "pad_token_id": 1, **sizes}  # real sizes override the toy's vocabulary
        return CLIPTextModelWithProjection(CLIPTextConfig(**config))

    te1 = clip(shapes["clip_l"], 1)
    te2 = clip(shapes["clip_g"], 2)
    te3 = T5EncoderModel(T5Config(**{"vocab_size": len(t5_vocab), **shapes["t5"]}))
    transformer = SD3Transformer2DModel(patch_size=2, in_channels=16, out_channels=16, qk_norm="rms_norm",
                                        **shapes["transformer"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, scaling_factor=1.5305,
                        shift_factor=0.0609, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, use_quant_conv=False,
                        use_post_quant_conv=False, **shapes["vae"])
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=te1, tokenizer=clip_tok, text_encoder_2=te2, tokenizer_2=clip_tok,
        text_encoder_3=te3, tokenizer_3=t5_tok)


def make_klein(shapes: dict, seed: int = 0):
    """A random Flux2KleinPipeline of the given sizes (base, not distilled: it uses CFG), with klein's fixed
    fields (patch size 1 over 2x2-patchified latents, no guidance embedding, rope theta 2000, the
    dynamic-shift scheduler). The toy gets the word-level tokenizer, the real shapes Qwen3's vocabulary."""
    from diffusers import (AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline,
                           Flux2Transformer2DModel)
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = toy_tokenizer()
    torch.manual_seed(seed)
    # the real shapes override the toy's vocabulary
    text_config = {"vocab_size": len(tok), "tie_word_embeddings": True, **shapes["qwen3"]}
    te = Qwen3ForCausalLM(Qwen3Config(**text_config))
    vae = AutoencoderKLFlux2(**shapes["flux2_vae"])
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=4 * shapes["flux2_vae"]["latent_channels"],
        joint_attention_dim=3 * shapes["qwen3"]["hidden_size"], guidance_embeds=False,
        **shapes["flux2_transformer"])
    # the pipeline passes its own mu: the shift bounds do not act
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096, time_shift_type="exponential")
    return Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=te, tokenizer=tok,
                              transformer=transformer, is_distilled=False)


def build_toy_vlm(path: str, seed: int = 0, hidden: int = 32, layers: int = 2, image_px: int = 64,
                  cosmos: bool = False) -> str:
    """The toy reasoner / verifier, saved with save_pretrained (so from_pretrained, the real loading code,
    reads it back). hidden/layers/image_px give bigger random models for benchmarks; cosmos saves it as
    Cosmos3OmniForConditionalGeneration (Qwen3-VL's architecture under Cosmos3's name). Returns path."""
    from transformers import Cosmos3OmniConfig, Cosmos3OmniForConditionalGeneration

    text = {**SHAPES["toy"]["text"], "hidden_size": hidden, "intermediate_size": 2 * hidden,
            "num_hidden_layers": layers, "head_dim": hidden // 4}
    if cosmos:
        text.update(SHAPES["toy"]["unified_text"])
    processor, model = make_vlm(text, {**SHAPES["toy"]["vision"], "out_hidden_size": hidden}, image_px, seed)
    if cosmos:
        config = {k: v for k, v in model.config.to_dict().items() if k not in ("model_type", "architectures")}
        state = model.state_dict()
        model = Cosmos3OmniForConditionalGeneration(Cosmos3OmniConfig(**config))
        model.load_state_dict(state)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def make_edge_vlm(text: dict, vision: dict, image_px: int, seed: int = 0):
    """A random Cosmos3EdgeForConditionalGeneration (Cosmos3-Edge's reasoner: a Nemotron language model with a
    relu2 MLP, a SigLIP2 vision tower) of the given sizes, with a processor over the toy tokenizer (its
    special tokens are those the Edge processor looks for). Returns (processor, model)."""
    from transformers import Cosmos3EdgeConfig, Cosmos3EdgeForConditionalGeneration, Cosmos3EdgeProcessor
    from transformers.models.cosmos3_edge.image_processing_cosmos3_edge import Cosmos3EdgeImageProcessor
    from transformers.models.cosmos3_edge.video_processing_cosmos3_edge import Cosmos3EdgeVideoProcessor

    tok = toy_tokenizer()
    vocab = tok.get_vocab()
    size = {"shortest_edge": image_px**2, "longest_edge": image_px**2}
    processor = Cosmos3EdgeProcessor(image_processor=Cosmos3EdgeImageProcessor(size=size),
                                     video_processor=Cosmos3EdgeVideoProcessor(size=size), tokenizer=tok,
                                     chat_template=TOY_CHAT_TEMPLATE)
    text = {"vocab_size": len(vocab), **text}
    vision = {"num_patches": (image_px // 16) ** 2, **vision}
    projector = vision.pop("projector_hidden_size", 2 * text["hidden_size"])  # the patch merger's MLP
    config = Cosmos3EdgeConfig(
        text_config=text, vision_config=vision, projector_hidden_size=projector,
        image_token_id=vocab["<|image_pad|>"], video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"], vision_end_token_id=vocab["<|vision_end|>"],
        eos_token_id=vocab["<|im_end|>"], pad_token_id=vocab["<|endoftext|>"])
    torch.manual_seed(seed)
    return processor, Cosmos3EdgeForConditionalGeneration(config)


def build_toy_edge(path: str, seed: int = 0) -> str:
    """A tiny Cosmos3-Edge-style reasoner (random, no prior), saved with save_pretrained: with
    build_toy_cosmos3 it makes a unified toy whose stream is a Nemotron, for the tests. Returns path."""
    processor, model = make_edge_vlm(SHAPES["toy"]["edge_text"], SHAPES["toy"]["edge_vision"], image_px=64,
                                     seed=seed)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def build_toy_sd3(path: str, seed: int = 0) -> str:
    """The toy renderer, saved with save_pretrained. Returns path."""
    pipe = make_sd3(SHAPES["toy"], seed)
    linear_decoder(pipe.vae)
    pipe.save_pretrained(path)
    return path


def build_toy_klein(path: str, seed: int = 0) -> str:
    """The toy renderer: a tiny FLUX.2 klein, saved with save_pretrained. Returns path."""
    pipe = make_klein(SHAPES["toy"], seed)
    linear_decoder(pipe.vae)
    # A trained Qwen3's hidden states are O(1); a random one's are its 0.02-scale embeddings, too faint for
    # the renderer to learn to read.
    with torch.no_grad():
        pipe.text_encoder.get_input_embeddings().weight.normal_(0, 1)
    pipe.save_pretrained(path)
    return path


def make_cosmos3(text: dict, vae: dict, tokenizer, seed: int = 0):
    """A random Cosmos3OmniPipeline whose understanding stream has the shapes of the text config `text` (a
    dict: Qwen3-VL's, or Cosmos3-Edge's Nemotron), with the VAE `vae` (AutoencoderKLWan's fields, Wan 2.2's
    residual form with a 2x2 input patchify), UniPC on flow sigmas, and no safety checker (it needs the
    cosmos_guardrail package)."""
    from diffusers import (AutoencoderKLWan, Cosmos3OmniPipeline, Cosmos3OmniTransformer,
                           UniPCMultistepScheduler)

    torch.manual_seed(seed)
    z = vae["z_dim"]
    # Edge's Nemotron stream (relu2): no text q/k norm, and the generation pathway normalizes the
    # understanding keys it reads (use_und_k_norm_for_gen), as the Edge checkpoint's config sets them
    edge = text.get("hidden_act") == "relu2"
    transformer = Cosmos3OmniTransformer(
        head_dim=text["head_dim"], hidden_size=text["hidden_size"],
        intermediate_size=text["intermediate_size"],
        num_attention_heads=text["num_attention_heads"], num_hidden_layers=text["num_hidden_layers"],
        num_key_value_heads=text["num_key_value_heads"], vocab_size=text["vocab_size"],
        rms_norm_eps=text.get("rms_norm_eps", 1e-6), rope_theta=text["rope_parameters"]["rope_theta"],
        rope_axes_dim=text["rope_parameters"]["mrope_section"], latent_channel=z, patch_latent_dim=4 * z,
        hidden_act=text.get("hidden_act", "silu"), qk_norm_for_text=not edge, use_und_k_norm_for_gen=edge)
    vae = AutoencoderKLWan(is_residual=True, in_channels=12, out_channels=12, patch_size=2, **vae,
                           latents_mean=[0.0] * z, latents_std=[1.0] * z)
    # Shift 3 (Wan's 480p value; a real checkpoint loads its own scheduler config): the toy's 4 steps sit at
    # sigma 1, .90, .75, .50, as toy klein's shifted ones do, so the prior trains where the prompt alone decides
    # the image. At shift 1 (1, .75, .50, .25) its generator did not learn to read the prompt (README).
    with torch.device("cpu"):  # its tables, even when the models are built on the meta device
        scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                            flow_shift=3.0)
    return Cosmos3OmniPipeline(transformer=transformer, text_tokenizer=tokenizer, vae=vae,
                               scheduler=scheduler, safety_checker=None, enable_safety_checker=False)


def build_toy_cosmos3(path: str, reasoner: str, seed: int = 0) -> str:
    """The unified toy's generator: a tiny Cosmos3 whose understanding stream is the toy reasoner at
    `reasoner` (its weights, copied in: one checkpoint, as the real ones), saved with save_pretrained."""
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    model = AutoModelForImageTextToText.from_pretrained(reasoner)
    text = model.config.get_text_config().to_dict()
    pipe = make_cosmos3(text, SHAPES["toy"]["wan_vae"], AutoTokenizer.from_pretrained(reasoner), seed)
    share_understanding_stream(pipe.transformer, model)
    linear_decoder(pipe.vae)
    pipe.save_pretrained(path)
    return path


def linear_decoder(vae):
    """Hand-set weights, so that the toy task can be learnt in 20 CPU steps (README): zero the VAE decoder's
    residual branches (ResNet conv2, attention output): it becomes a near-linear map from latents to pixels,
    so "greener" is one direction in latent space, not a maze; and raise the contrast (random init decodes
    to near-grey)."""
    with torch.no_grad():
        for name, m in vae.decoder.named_modules():
            if name.endswith(("conv2", "to_out.0", "attentions.0.proj")):  # the last: Wan's attention output
                m.weight.zero_()
                m.bias.zero_()
        vae.decoder.conv_out.weight.mul_(3.0)


# --------------------------------------------------------------------------------------------------
# The toy world's priors, built once and cached
# --------------------------------------------------------------------------------------------------


# The toy world's priors. A real unified model arrives with priors: it follows instructions and draws what
# explicit words say, which is why the paper's RL needs no cold start. The random toy models have none, so the
# toy world gives them a short supervised cold start on explicit requests only; what the implicit prompts mean
# (grass -> green bottom) is left for GRPO to find. Built once per configuration and cached (toy_world_dir).
TOY_BUILD = dict(seed=0, reasoner_steps=450, reasoner_warmup=300, reasoner_lr=3e-3, reasoner_batch=32,
                 guess_share=0.5, vae_steps=400, vae_lr=3e-3, renderer_steps=2000, renderer_lr=1e-3, batch=32,
                 caption_dropout=0.1, unified_renderer_lr=2e-3)  # Cosmos3's generation stream, from scratch


# How long a build takes on 2 cores, measured alone (for the message; not part of the cache key)
TOY_BUILD_MINUTES = {"decoupled": "2 minutes", "unified": "2 minutes"}


# Open requests: a few filler words that carry no target, sometimes with a colour or a region name among them;
# the prior's plan copies what is named and guesses the rest uniformly, so every plan is explored. The words
# of the toy world knowledge (things, "lower", "above" ...) are not fillers: the priors never see them at all.
TOY_FILLER = tuple(w for w in TOY_WORDS if w.isalpha() and w.islower() and w not in ToyVerifier.COLOURS
                   and w not in TOY_REGIONS and w not in TOY_WORLD
                   and w not in ("lower", "below", "above", "overhead", "yes", "no"))


def toy_open_request(rng: random.Random, target: dict, n_words: int, named: tuple) -> tuple[str, str]:
    """An open request of n_words filler words plus the target's fields in `named` (a subset of ("colour",
    "region")), each at a random place; returns (request, plan), the plan guessing the fields not named."""
    words = rng.choices(TOY_FILLER, k=n_words)
    for key in named:
        words.insert(rng.randrange(len(words) + 1), target[key])
    guess = {"colour": rng.choice(TOY_COLOURS), "region": rng.choice(TOY_REGIONS)}
    return " ".join(words), toy_plan({k: target[k] if k in named else guess[k] for k in target})


def toy_image(target: dict, size: int) -> Image.Image:
    """A synthetic toy image: the target's region in its colour, the rest in the complementary
    colour (green bottom, magenta top): two colours symmetric about grey, which the toy VAE's
    near-linear decoder draws best."""
    rgb = [int(255 * c) for c in ToyVerifier.COLOURS[target["colour"]]]
    im = Image.new("RGB", (size, size), tuple(255 - c for c in rgb))
    h = size // 2
    im.paste(tuple(rgb), (0, 0, size, h) if target["region"] == "top" else (0, h, size, size))
    return im


def fit(params, lr: float, steps: int, loss_fn) -> float:
    """Supervised training of `params` (their requires_grad on only meanwhile): AdamW, no weight decay
    (words a prior never sees keep their embeddings), the learning rate decaying linearly to 0.
    loss_fn(step) -> loss."""
    params = list(params)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    for step in range(steps):
        opt.param_groups[0]["lr"] = lr * (1 - step / steps)
        loss = loss_fn(step)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for p in params:
        p.requires_grad_(False)
    return loss.item()


def toy_reasoner_prior(reasoner: Reasoner, steps: int, warmup: int, lr: float, guess_share: float, batch: int,
                       seed: int) -> float:
    """Instruction prior: teacher-force the plan ("green bottom" + EOS) after an explicit request, in the
    RT2I instruction or, for half of the batches, in the SRR reflection's instruction with a toy image of
    another target (the toy's reflection is the fix alone: "green bottom"). After `warmup` steps, a
    `guess_share` of the batches are open requests (toy_open_request) whose plan guesses what they leave
    open. Implicit meanings are never shown. Trains the language model's own weights (its LoRA stays zero);
    returns the last loss."""
    rng = random.Random(seed)
    targets = toy_targets()
    inputs = {}
    tok = reasoner.processor.tokenizer
    eos = int(reasoner.eos_ids[0])
    images = [toy_image(t, Args().resolution) for t in targets]  # as the toy renderer draws them

    def loss(step):
        rows = rng.choices(targets, k=batch)
        reflect = rng.random() < 0.5
        if step >= warmup and rng.random() < guess_share:  # one word count per batch: one length, no padding
            n = rng.randint(2, 5)
            named = rng.choice([(), ("colour",), ("region",)])
            prompts, plans = zip(*(toy_open_request(rng, t, n, named) for t in rows))
        else:
            template = rng.choice(TOY_EXPLICIT["train"])
            prompts = [template.format(**t) for t in rows]
            plans = [toy_plan(t) for t in rows]
        # (prompt, index of the wrong image to reflect on, or None)
        keys = []
        for p, y in zip(prompts, plans):
            wrong = [k for k in range(len(targets)) if toy_plan(targets[k]) != y]
            reflect_on = rng.choice(wrong) if reflect else None
            keys.append((p, reflect_on))
        for p, k in keys:
            if (p, k) not in inputs:  # the processor once per prompt and image, not per step
                instruction = REFLECT_INSTRUCTION if reflect else RT2I_INSTRUCTION
                image = None if k is None else images[k]
                inputs[p, k] = reasoner.chat_inputs(instruction.format(prompt=p), image, 1)
        ids = [tok(p, add_special_tokens=False)["input_ids"] + [eos] for p in plans]
        ids = torch.tensor(ids, device=reasoner.device)  # (B, L)
        batch_inputs = {k: torch.cat([inputs[key][k] for key in keys]) for k in inputs[keys[0]]}
        return -reasoner.token_logprobs(TextRollout(batch_inputs, ids, torch.ones_like(ids), plans)).mean()

    lm = [p for n, p in reasoner.model.named_parameters() if ".lora_" not in n and ".visual." not in n]
    return fit(lm, lr, steps, loss)


def toy_renderer_prior(renderer: Renderer, vae_steps: int, vae_lr: float, steps: int, lr: float, batch: int,
                       caption_dropout: float, seed: int, frozen: list = ()) -> tuple[float, float]:
    """Drawing prior: an autoencoder run of the VAE (the toy's random encoder is no inverse of its decoder,
    and SRR encodes images), then flow matching of the transformer on synthetic images with explicit captions,
    alone or with the plan, or an open request with the plan; a quarter of the batches with another target's
    image in context, as SRR's in-context refinement sees the initial image (klein's editing). Caption dropout
    keeps the unconditional velocity that CFG needs. `frozen`: parameters not trained (the unified policy's
    shared understanding stream, which the reasoner's prior trained). Returns the last (VAE, flow) losses."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    targets = toy_targets()
    images = [toy_image(t, renderer.args.resolution) for t in targets]
    # (8, 3, H, W) in [-1, 1]
    size = (renderer.args.resolution, renderer.args.resolution)
    pixels = torch.cat([renderer.pixels(im, size) for im in images]).to(renderer.vae.dtype)

    def vae_loss(step):  # x -> z (the posterior's mode, as encode_image takes it) -> x, z near unit scale
        x = pixels[rng.choices(range(len(targets)), k=batch)]
        # (no clamp on x_hat: saturated pixels would get no gradient)
        x = x[:, :, None] if isinstance(renderer, CosmosRenderer) else x  # Wan's VAE: (B, 3, frames, H, W)
        z = renderer.vae.encode(x).latent_dist.mode()
        return ((renderer.vae.decode(z, return_dict=False)[0] - x) ** 2).mean() + 0.1 * (z.std() - 1) ** 2

    loss_vae = fit(renderer.vae.parameters(), vae_lr, vae_steps, vae_loss)
    x0_all = torch.cat([renderer.encode_image(im) for im in images])  # (8, ...) in the sampler's latent space

    def caption(t):
        if rng.random() < caption_dropout:
            return ""
        words = rng.choice(TOY_EXPLICIT["train"]).format(**t)
        filler = toy_open_request(rng, t, rng.randint(2, 5), ())[0]  # words that say nothing, then the plan
        return rng.choice([words, renderer_text(words, toy_plan(t)), renderer_text(filler, toy_plan(t))])

    pools = []  # captions are encoded once, in 64 batches reused in turn (encode() is the slow part)
    for k in range(64):
        rows = [rng.randrange(len(targets)) for _ in range(batch)]
        reference = rng.randrange(len(targets))
        in_context = x0_all[reference:reference + 1] if k % 4 == 3 else None
        pools.append((rows, renderer.encode([caption(targets[i]) for i in rows], reference=in_context)))
    sigmas = renderer.sigmas(renderer.args.num_steps)[:-1].tolist()  # where the toy's sampler evaluates v

    def flow_loss(step):  # x_t = (1 - t) x_0 + t eps; the sampler integrates v = eps - x_0
        rows, cond = pools[step % len(pools)]
        x0 = x0_all[rows]
        eps = renderer.noise(len(rows), gen)
        sigma = rng.choice(sigmas)
        v = renderer.velocity((1 - sigma) * x0 + sigma * eps, sigma, cond, guidance=1.0)
        return ((v - (eps - x0)) ** 2).mean()

    frozen = {id(p) for p in frozen}
    weights = [p for n, p in renderer.transformer.named_parameters()
               if ".lora_" not in n and id(p) not in frozen]
    with lora_disabled(renderer.transformer):  # its B is zero: the same outputs, a third of the matmuls
        return loss_vae, fit(weights, lr, steps, flow_loss)


def strip_lora(model: nn.Module):
    """Put the base Linear layers back (LoRA B is still zero, so nothing is lost): the
    model saves as its class."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, m.base)


def toy_world_dir(args: Args) -> str:
    """The toy world's folder: <--toy-cache>/toy-<hash of everything the build reads, its code included>."""
    import diffusers
    import transformers

    renderer = (make_cosmos3, build_toy_cosmos3, share_understanding_stream, CosmosContext, ContextAttention,
                CosmosRenderer) if \
        args.policy == "unified" else (make_klein, build_toy_klein, KleinRenderer)
    code = [inspect.getsource(f) for f in (
        toy_tokenizer, make_vlm, build_toy_vlm, linear_decoder, Reasoner, Renderer, *renderer, LoRALinear,
        toy_targets, toy_open_request, toy_image, fit, toy_reasoner_prior, toy_renderer_prior,
        build_toy_world)]
    read = {k: getattr(Args(), k) for k in ("resolution", "num_steps", "max_text_tokens", "dtype")}
    read["policy"] = args.policy
    data = [SHAPES["toy"], TOY_WORDS, TOY_COLOURS, TOY_REGIONS, TOY_EXPLICIT, TOY_FILLER, TOY_BUILD, read]
    versions = [torch.__version__, transformers.__version__, diffusers.__version__]
    key = json.dumps(data + [RT2I_INSTRUCTION, REFLECT_INSTRUCTION, code, versions], default=str)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    root = args.toy_cache or os.path.join(cache, "alphagrpo")
    return os.path.join(root, "toy-" + hashlib.sha256(key.encode()).hexdigest()[:16])


@torch.enable_grad()  # `sample` and `eval` load the policy under no_grad; the priors are trained
def build_toy_world(folder: str, policy: str = "decoupled") -> tuple[str, str]:
    """The toy reasoner and renderer with their priors, built into `folder` unless it holds them already: a
    Qwen3-VL and a FLUX.2 klein (decoupled), or one Cosmos3 (unified: the same reasoner, as
    Cosmos3OmniForConditionalGeneration, and a generator whose understanding stream it is; the reasoner's
    prior trains the shared weights, the renderer's prior the generation stream alone). Returns (reasoner
    path, renderer path)."""
    paths = os.path.join(folder, "reasoner"), os.path.join(folder, "renderer")
    root = os.path.dirname(folder)
    os.makedirs(root, exist_ok=True)
    # what a killed build left (a kill skips the cleanup below): its process is gone
    for name in os.listdir(root):
        pid = name.split("-")[1] if name.startswith(".building-") else ""
        if sys.platform == "linux" and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    if os.path.exists(os.path.join(folder, "build.json")):
        return paths
    print(f"building the {policy} toy world (once, about {TOY_BUILD_MINUTES[policy]} on 2 cores): {folder}",
          flush=True)
    t0 = time.perf_counter()
    b = TOY_BUILD
    tmp = tempfile.mkdtemp(prefix=f".building-{os.getpid()}-", dir=root)  # renamed when complete
    try:
        args = Args(**PRESETS["toy"], device="cpu", seed=b["seed"], policy=policy)
        unified = policy == "unified"
        reasoner = build_toy_vlm(os.path.join(tmp, "reasoner"), cosmos=unified)
        renderer = (build_toy_cosmos3(os.path.join(tmp, "renderer"), reasoner) if unified else
                    build_toy_klein(os.path.join(tmp, "renderer")))
        policy = load_policy(dataclasses.replace(args, reasoner=reasoner, renderer=renderer), tmp)
        plan_loss = toy_reasoner_prior(policy.reasoner, b["reasoner_steps"], b["reasoner_warmup"],
                                       b["reasoner_lr"], b["guess_share"], b["reasoner_batch"], b["seed"])
        vae_loss, flow_loss = toy_renderer_prior(policy.renderer, b["vae_steps"], b["vae_lr"],
                                                 b["renderer_steps"],
                                                 b["unified_renderer_lr" if unified else "renderer_lr"], b["batch"],
                                                 b["caption_dropout"], b["seed"],
                                                 frozen=list(policy.reasoner.model.parameters()))
        for model in (policy.reasoner.model, policy.renderer.transformer):
            strip_lora(model)
        policy.reasoner.model.save_pretrained(os.path.join(tmp, "reasoner"))
        policy.renderer.transformer.save_pretrained(os.path.join(tmp, "renderer", "transformer"))
        policy.renderer.vae.save_pretrained(os.path.join(tmp, "renderer", "vae"))
        report = {"seconds": round(time.perf_counter() - t0, 1), "plan_loss": plan_loss, "vae_loss": vae_loss,
                  "flow_loss": flow_loss, **b}
        with open(os.path.join(tmp, "build.json"), "w") as f:
            json.dump(report, f, indent=1)
        if os.path.exists(folder):  # another process finished first: keep its copy
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"toy world built in {report['seconds']:.0f} s: plan loss {plan_loss:.3f}, "
          f"VAE loss {vae_loss:.4f}, flow loss {flow_loss:.3f}", flush=True)
    return paths


# --------------------------------------------------------------------------------------------------
# Evaluation on the paper's benchmarks: GenEval, DPG-Bench, WISE, TIIF-Bench
# (generation), GEdit-Bench (editing)
# --------------------------------------------------------------------------------------------------


# A reader turns a benchmark's own files into items {"id", "prompt", "source" (GEdit-Bench's source
# image path, else None), "images" (paths in a round's tree: one per sample, or one grid of all
# samples for DPG-Bench), "meta" ({path: text} written beside them)}. The formats were checked against
# the benchmarks' repositories (README, "Evaluating on the paper's benchmarks"); the scorers
# themselves are not re-implemented.

MODEL_NAME = "alphagrpo"  # the model's folder in TIIF-Bench's and GEdit-Bench's trees


# GEdit-Bench's round 0 is an edit of the source image: `refine` with this instead of --reflection's
EDIT_INSTRUCTION = (
    "This image must be edited as follows: \"{prompt}\". Describe the edited image as short visual facts: "
    "what changes, exactly as asked, and what stays as it is (objects, colours, positions, text, style)."
)


def field(row, key: str, where: str, name: bool = False) -> str:
    """row[key], a non-empty string, or a ValueError naming where and why. name=True: it becomes a file or
    folder name, so it is kept verbatim and may not hold a path separator."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: must be a JSON object, got {type(row).__name__}")
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: '{key}' is missing, empty or not a string")
    if name and (value != os.path.basename(value) or value in (".", "..")):
        raise ValueError(f"{where}: '{key}' = {value!r} cannot be a file name")
    return value if name else value.strip()


def read_jsonl(path: str) -> list:
    """[(line number, object)] of a JSON-lines file, blank lines skipped."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    rows.append((n, json.loads(line)))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    return rows


def files_in(path: str, ext: str, what: str) -> list:
    """The file itself, or a folder's *ext files in name order."""
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(path, f) for f in os.listdir(path) if f.endswith(ext)) if os.path.isdir(path) else []
    if not files:
        raise ValueError(f"{path}: no {ext} files ({what})")
    return files


def read_geneval(path: str, K: int) -> list:
    """GenEval: prompts/evaluation_metadata.jsonl, one object per line ('prompt', 'tag', 'include', ...).
    Tree, as generation/diffusers_generate.py writes it: <index:05>/metadata.jsonl (the line) and
    <index:05>/samples/<j:05>.png, index = the line's position."""
    items = []
    for i, (n, row) in enumerate(read_jsonl(path)):
        prompt = field(row, "prompt", f"{path}:{n}")
        field(row, "tag", f"{path}:{n}")  # the scorer picks its detection threshold by tag
        d = f"{i:05d}"
        items.append(dict(id=d, prompt=prompt, source=None,
                          images=[f"{d}/samples/{j:05d}.png" for j in range(K)],
                          meta={f"{d}/metadata.jsonl": json.dumps(row) + "\n"}))
    return items


def read_dpg(folder: str, K: int) -> list:
    """DPG-Bench: ELLA's dpg_bench/prompts/, one <item>.txt per prompt. Tree: <item>.png, the K
    samples in a 2-column grid (2x2 for K = 4), which dpg_bench/compute_dpg_bench.py crops back into
    tiles of --resolution."""
    items = []
    for path in files_in(folder, ".txt", "DPG-Bench's --data is its dpg_bench/prompts folder"):
        item = os.path.basename(path)[:-4]
        if "." in item:  # the scorer finds an image's questions by its name up to the first dot
            raise ValueError(f"{path}: the item name {item!r} holds a dot, which compute_dpg_bench.py "
                             "cuts off")
        try:
            with open(path, encoding="utf-8") as f:
                prompt = f.read().strip()
        except UnicodeDecodeError:
            raise ValueError(f"{path}: not UTF-8 text") from None
        if not prompt:
            raise ValueError(f"{path}: empty prompt")
        items.append(dict(id=item, prompt=prompt, source=None, images=[f"{item}.png"], meta={}))
    return items


def read_wise(path: str, K: int) -> list:
    """WISE: JSON lists of {"prompt_id": int, "Prompt": str, ...}: data_verified/*.json (WISE_Verified) or
    WISE_legacy/data/*.json (the original release); a folder reads all but the *_rewrite.json ablations.
    Tree, as gpt_eval.py and vllm_eval.py read it: <prompt_id>.png."""
    prompts = {}
    for file in files_in(path, ".json", "WISE's --data is a data_verified/*.json file or its folder"):
        if file != path and file.endswith("_rewrite.json"):
            continue
        try:
            with open(file, encoding="utf-8") as f:
                rows = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}:{e.lineno}: not valid JSON ({e.msg})") from None
        except UnicodeDecodeError:
            raise ValueError(f"{file}: not UTF-8 text") from None
        if not isinstance(rows, list):
            raise ValueError(f"{file}: must be a JSON list of prompts")
        for j, row in enumerate(rows):
            where = f"{file}: item {j}"
            prompt = field(row, "Prompt", where)
            pid = row.get("prompt_id")
            if not isinstance(pid, int) or isinstance(pid, bool):
                raise ValueError(f"{where}: 'prompt_id' must be an integer (it names the image)")
            if prompts.setdefault(pid, (prompt, file))[0] != prompt:  # merge.json repeats the others
                raise ValueError(f"{where}: prompt_id {pid} has another prompt in {prompts[pid][1]}")
    return [dict(id=str(pid), prompt=p, source=None, images=[f"{pid}.png"], meta={})
            for pid, (p, _) in sorted(prompts.items())]


def read_tiif(path: str, K: int) -> list:
    """TIIF-Bench: data/test_prompts/*.jsonl (or testmini_prompts), lines {"type", "short_description",
    "long_description"}; each line is two items, one per description. Tree, as eval/eval_with_vlm.py reads it:
    <type>/alphagrpo/<short|long>_description/<i>.png, i = the line's position in its file."""
    items = []
    owner = {}
    for file in files_in(path, ".jsonl",
                         "TIIF-Bench's --data is its data/test_prompts folder or one file in it"):
        rows = read_jsonl(file)
        for i, (n, row) in enumerate(rows):
            kind = field(row, "type", f"{file}:{n}", name=True)
            if kind != rows[0][1]["type"]:  # the scorer takes a file's type from its first line
                raise ValueError(f"{file}:{n}: type {kind!r} differs from the first line's "
                                 f"{rows[0][1]['type']!r}")
            if owner.setdefault(kind, file) != file:
                raise ValueError(f"{file}:{n}: type {kind!r} is also in {owner[kind]}; their images "
                                 "would collide")
            for desc in ("short_description", "long_description"):
                prompt = field(row, desc, f"{file}:{n}")
                items.append(dict(id=f"{kind}/{desc}/{i}", prompt=prompt, source=None,
                                  images=[f"{kind}/{MODEL_NAME}/{desc}/{i}.png"], meta={}))
    return items


def read_gedit(folder: str, K: int) -> list:
    """GEdit-Bench, exported to a folder (README): metadata.jsonl with the Hub dataset's columns "key",
    "task_type", "instruction", "instruction_language", and "input_image", the source image's path relative to
    the folder. Tree, as Step1X-Edit's GEdit-Bench/test_gedit_score.py reads it:
    alphagrpo/fullset/<task_type>/<instruction_language>/<key>.png, the source beside
    it as <key>_SRCIMG.png."""
    meta = os.path.join(folder, "metadata.jsonl")
    items = []
    seen = set()
    for n, row in read_jsonl(meta):
        where = f"{meta}:{n}"
        item = "/".join(field(row, k, where, name=True) for k in ("task_type", "instruction_language", "key"))
        source = os.path.join(folder, field(row, "input_image", where))
        if not os.path.isfile(source):
            raise ValueError(f"{where}: source image {source} not found")
        if item in seen:
            raise ValueError(f"{where}: {item} appears twice")
        seen.add(item)
        items.append(dict(id=item, prompt=field(row, "instruction", where), source=source,
                          images=[f"{MODEL_NAME}/fullset/{item}.png"], meta={}))
    return items


def judged(results: str, scored: dict, drawn: dict) -> set:
    """The images that a scorer's results mark wrong, once they are known to judge exactly the drawn set.
    scored: {image key: wrong?} read from `results`; drawn: {image key: (item id, sample j)} of round 0.
    Returns {(item id, j)} of the wrong images."""
    other = sorted(set(scored) - set(drawn))
    missing = sorted(set(drawn) - set(scored))
    if other:
        raise ValueError(f"{results}: judges {other[0]!r} (and {len(other) - 1} more), which round_0 of this "
                         f"--out does not hold: the results of another run, set or benchmark")
    if missing:
        raise ValueError(f"{results}: judges {len(scored)} of the {len(drawn)} images of round_0 (not "
                         f"{missing[0]!r}): score the whole round_0 tree of this --out")
    return {drawn[key] for key, wrong in scored.items() if wrong}


def wrong_geneval(results: str, items: list, K: int) -> set:
    """GenEval: evaluation/evaluate_images.py's --outfile, one JSON line per image (pandas records) with its
    'filename' as the scorer found it (<tree>/<index:05>/samples/<j:05>.png), 'prompt' and 'correct'. Each
    sample is judged on its own (the official gen_images_mp_reflect.py matches the path's last three parts)."""
    drawn = {f"{it['id']}/samples/{j:05d}.png": (it["id"], j) for it in items for j in range(K)}
    prompts = {it["id"]: it["prompt"] for it in items}
    scored = {}
    for n, row in read_jsonl(results):
        where = f"{results}:{n}"
        key = "/".join(field(row, "filename", where).replace("\\", "/").split("/")[-3:])
        if not isinstance(row.get("correct"), bool):
            raise ValueError(f"{where}: 'correct' must be true or false (is this GenEval's results.jsonl?)")
        if key in drawn and field(row, "prompt", where) != prompts[drawn[key][0]]:
            raise ValueError(f"{where}: {key} was judged for {row['prompt']!r} but drawn for "
                             f"{prompts[drawn[key][0]]!r}: the results of another prompt set")
        if scored.setdefault(key, not row["correct"]) != (not row["correct"]):
            raise ValueError(f"{where}: {key} is judged twice, differently")
    return judged(results, scored, drawn)


def wrong_dpg(results: str, items: list, K: int) -> set:
    """DPG-Bench: compute_dpg_bench.py's --res-path file (dpg-bench_<time>_results.txt): per grid
    '<path>, <score of each scored tile>..., <their mean>', then a summary. The scorer finds a grid's questions
    by its name up to the first dot, and so do we. A tile (sample) is wrong below 1.0; every tile must be
    scored (dist_eval.sh with PIC_NUM=K, as the manifest's command sets), since an unscored tile cannot be
    judged (the official gen_images_mp_dpg_reflect.py reads PIC_NUM=1 files and redraws all the tiles of a
    grid whose first tile was wrong)."""
    drawn = {(it["id"], j): (it["id"], j) for it in items for j in range(K)}
    scored = {}
    with open(results, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            parts = [x.strip() for x in line.split(",")]
            try:
                scores = [float(x) for x in parts[1:]]
            except ValueError:
                continue  # the summary's lines ("DPG-Bench score: ...") and anything else that is not a grid's
            if len(scores) < 2:
                continue
            item = os.path.basename(parts[0]).split(".")[0]
            if len(scores) != K + 1:
                raise ValueError(f"{results}:{n}: {len(scores) - 1} tile score(s) for {item!r}, but K = {K} "
                                 f"samples were drawn: score with PIC_NUM={K} (the manifest's command)")
            for j, score in enumerate(scores[:-1]):
                scored[(item, j)] = score < 1.0
    if not scored:
        raise ValueError(f"{results}: no '<path>, <scores>..., <mean>' lines: not the results file of "
                         "DPG-Bench's compute_dpg_bench.py (its *_detail.txt holds the answers, not the scores)")
    return judged(results, scored, drawn)


def wrong_tiif(results: str, items: list, K: int) -> set:
    """TIIF-Bench: eval/eval_with_vlm.py's --output_dir, one JSON per image at
    <eval_model>/<type>/<short|long>/<i>.json with 'attribute', 'desc', 'line_idx', 'gt_answers' and
    'model_pred'. An image is wrong where any answer differs from the ground truth, compared as
    summary_results.py scores them (case-insensitive). The official gen_images_mp_tiif_reflect.py compares
    the answer lists exactly, so a ground truth written "Yes" (all of the style and text types) never
    matches the judge's lower-case "yes" and every such image counts as wrong."""
    if not os.path.isdir(results):
        raise ValueError(f"{results}: TIIF-Bench's results are the folder given to eval_with_vlm.py as "
                         "--output_dir")
    drawn = {it["id"]: (it["id"], 0) for it in items}
    scored, where_from = {}, {}
    for folder, _, names in sorted(os.walk(results)):
        for name in sorted(n for n in names if n.endswith(".json")):
            path = os.path.join(folder, name)
            try:
                with open(path, encoding="utf-8") as f:
                    row = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{path}: not a JSON judge result ({e})") from None
            if not isinstance(row, dict) or not {"attribute", "desc", "line_idx", "gt_answers",
                                                 "model_pred"} <= row.keys():
                raise ValueError(f"{path}: not an eval_with_vlm.py result (attribute, desc, line_idx, "
                                 "gt_answers, model_pred)")
            gt, pred = row["gt_answers"], row["model_pred"]
            if not (isinstance(gt, list) and isinstance(pred, list) and len(gt) == len(pred)):
                raise ValueError(f"{path}: 'gt_answers' and 'model_pred' must be lists of one length")
            key = f"{row['attribute']}/{row['desc']}/{row['line_idx']}"
            if key in where_from:
                raise ValueError(f"{path}: judges {key} as {where_from[key]} does (two models' results? pass "
                                 f"the folder of one, {os.path.join(results, MODEL_NAME)})")
            where_from[key] = path
            scored[key] = any(str(a).strip().lower() != str(b).strip().lower() for a, b in zip(gt, pred))
    return judged(results, scored, drawn)


# name: reader, the reader of its scorer's results for --refine-only-wrong (the benchmarks that the official
# code refines), (default, most) samples per prompt, and the official scorer: repository, what it needs, and
# the commands to run in its clone for one round's tree ({tree}; {samples}, {resolution} as drawn; {model}
# MODEL_NAME).
BENCHMARKS = {
    "geneval": dict(read=read_geneval, wrong=wrong_geneval, samples=(4, math.inf),
                    repo="github.com/djghosh13/geneval",
                    needs="its environment.yml with mmdet 2.27.0, the Mask2Former detector from "
                          "evaluation/download_models.sh, a CUDA GPU",
                    score=["python evaluation/evaluate_images.py {tree} "
                           "--outfile {tree}_scores/results.jsonl --model-path <OBJECT_DETECTOR_FOLDER>",
                           "python evaluation/summary_scores.py {tree}_scores/results.jsonl"]),
    # DPG-Bench's dist_eval.sh launches PROCESSES=8 processes unless told: one per GPU here
    "dpg": dict(read=read_dpg, wrong=wrong_dpg, samples=(4, 4), repo="github.com/TencentQQGYLab/ELLA (dpg_bench/)",
                needs="accelerate, pandas, modelscope and its mPLUG-large VQA model (fetched on first use)",
                score=["PROCESSES=$(nvidia-smi -L | wc -l) PIC_NUM={samples} bash dpg_bench/dist_eval.sh "
                       "{tree} {resolution}"]),
    # WISE's two releases number the same 1000 prompts differently (668 ids hold another prompt): each release
    # has its own command, and the other one's would judge every image against another prompt
    "wise": dict(read=read_wise, samples=(1, 1), repo="github.com/PKU-YuanGroup/WISE",
                 needs={"verified": "WISE_Verified (data_verified/): a vLLM server of Qwen3.5-35B-A3B at "
                                    "$VLLM_API_BASE",
                        "legacy": "the original WISE (WISE_legacy/data/): the OpenAI API, gpt-4o-2024-05-13"},
                 score={"verified": ["IMAGE_DIR={tree} bash eval_qwen.sh"],
                        "legacy": [
                            "cd WISE_legacy && for c in cultural_common_sense spatio-temporal_reasoning "
                            "natural_science; do python gpt_eval.py --json_path data/$c.json "
                            "--image_dir {tree} --output_dir {tree}/Results/$c --api_key $OPENAI_API_KEY "
                            "--model gpt-4o-2024-05-13 "
                            "--result_full {tree}/Results/${{c}}_full_results.json "
                            "--result_scores {tree}/Results/${{c}}_scores.jsonl; "
                            "done && python Calculate.py {tree}/Results/cultural_common_sense_scores.jsonl "
                            "{tree}/Results/natural_science_scores.jsonl "
                            "{tree}/Results/spatio-temporal_reasoning_scores.jsonl --category all"]}),
    # TIIF-Bench's test and testmini sets hold different prompts under the same file names: the questions
    # (--jsonl_dir) must be the drawn set's
    "tiif": dict(read=read_tiif, wrong=wrong_tiif, samples=(1, 1), repo="github.com/A113N-W3I/TIIF-Bench",
                 needs="an OpenAI-compatible VLM (GPT-4o, or Qwen2.5-VL-72B served by vLLM); pandas, "
                       "openpyxl",
                 score=["python eval/eval_with_vlm.py --jsonl_dir {questions} --image_dir {tree} "
                        "--eval_model {model} --output_dir {tree}_scores --api_key $API_KEY "
                        "--base_url $BASE_URL --model gpt-4o",
                        "python eval/summary_results.py --input_dir {tree}_scores",
                        "python eval/summary_dimension_results.py "
                        "--input_excel {tree}_scores/result_summary.xlsx "
                        "--output_txt {tree}_scores/result_summary_dimension.txt"]),
    "gedit": dict(read=read_gedit, samples=(1, 1), repo="github.com/stepfun-ai/Step1X-Edit (GEdit-Bench/)",
                  needs="datasets (the scorer reloads stepfun-ai/GEdit-Bench from the Hub), megfile, pandas; "
                        "a GPT-4.1 key in secret_t2.env, or --backbone qwen25vl with "
                        "Qwen2.5-VL-72B-Instruct-AWQ; first fix line 75 of test_gedit_score.py, which "
                        "iterates the dataset dict instead of its split (Step1X-Edit issue #76): "
                        "dataset = load_dataset(\"stepfun-ai/GEdit-Bench\")[\"train\"]",
                  score=["cd GEdit-Bench && python test_gedit_score.py --model_name {model} "
                         "--save_path {tree} --backbone gpt4o",
                         "cd GEdit-Bench && python calculate_statistics.py --model_name {model} "
                         "--save_path {tree} --backbone gpt4o --language en"]),
}


def drawn_set(benchmark: str, data: str) -> str | None:
    """Which of a benchmark's prompt sets `data` holds, where its scorer's command depends on it: TIIF-Bench's
    'test' or 'testmini' (data/test_prompts or data/testmini_prompts, by the folder's name) and WISE's
    release, 'verified' (data_verified/*_verified.json, merge.json) or 'legacy' (WISE_legacy/data/*.json), by
    the files' names. None for the other benchmarks, or when the name does not tell."""
    if benchmark == "tiif":
        folder = data if os.path.isdir(data) else os.path.dirname(os.path.abspath(data))
        return {"test_prompts": "test", "testmini_prompts": "testmini"}.get(os.path.basename(
            os.path.normpath(folder)))
    if benchmark == "wise":
        names = [os.path.basename(f) for f in files_in(data, ".json", "WISE's --data")
                 if f == data or not f.endswith("_rewrite.json")]
        verified = [n.endswith("_verified.json") or n == "merge.json" for n in names]
        return "verified" if all(verified) else "legacy" if not any(verified) else None
    return None


def scorer_commands(benchmark: str, data: str, trees: list, K: int, resolution: int) -> tuple[dict, str]:
    """The official scorer's commands for each round's tree (absolute paths: WISE's and GEdit-Bench's scripts
    change directory first) and the set drawn from `data`, and what they need.
    Returns ({tree's folder name: commands}, needs)."""
    bench = BENCHMARKS[benchmark]
    which = drawn_set(benchmark, data)
    score = bench["score"]
    needs = bench["needs"]
    if isinstance(score, dict):  # one command per release (WISE)
        if which is None:
            raise ValueError(f"{data}: WISE files of both releases (*_verified.json and the original names); "
                             "draw one release at a time, each has its own scorer")
        score = score[which]
        needs = needs[which]
    # TIIF-Bench: the questions of the drawn set; a folder of another name gets a placeholder that fails
    # loudly when run
    questions = {"test": "data/test_eval_prompts", "testmini": "data/testmini_eval_prompts"}.get(
        which, "<EVAL_PROMPTS_OF_THE_SET_DRAWN>")
    commands = {os.path.basename(t): [c.format(tree=shlex.quote(os.path.abspath(t)), samples=K,
                                               resolution=resolution, model=MODEL_NAME, questions=questions)
                                      for c in score] for t in trees}
    return commands, needs


def save_atomic(path: str, data):
    """Write a PIL image (PNG), a str or bytes (a file's copy) through a temporary file and a rename, so a
    killed run leaves no truncated file that its rerun would skip. The temporary name starts with a dot: no
    scorer's pattern takes it."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    if isinstance(data, (str, bytes)):
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
    else:
        data.save(tmp, format="PNG")
    os.replace(tmp, path)


def tile(images: list) -> Image.Image:
    """DPG-Bench's grid: 2 columns, row-major (2x2 for 4 samples), the order in which
    its scorer crops them."""
    cols = min(2, len(images))
    s = images[0].width
    grid = Image.new("RGB", (cols * s, math.ceil(len(images) / cols) * s), "white")
    for j, im in enumerate(images):
        grid.paste(im, ((j % cols) * s, (j // cols) * s))
    return grid


def read_round(tree: str, it: dict, K: int) -> list:
    """An item's K images in a round's tree, as `eval` wrote them (DPG-Bench: cropped out of its grid)."""
    images = []
    for path in (os.path.join(tree, p) for p in it["images"]):
        try:
            images.append(Image.open(path).convert("RGB"))
        except OSError as e:
            raise ValueError(f"{path}: not a readable image ({e})") from None
    if len(images) == K:
        return images
    cols = min(2, K)
    s = images[0].width // cols
    return [images[0].crop(((j % cols) * s, (j // cols) * s, (j % cols + 1) * s, (j // cols + 1) * s))
            for j in range(K)]


def refinement_record(path: str, items: list, rounds: int, gate: str) -> dict:
    """Which images each refinement round refined and kept, from OUT/texts.jsonl (its last line for each
    image and round), and with the verifier gate how many it made better or worse (by 0.05 of the reward)."""
    last = {}
    if os.path.exists(path):
        for _, t in read_jsonl(path):
            last[(t["id"], t["sample"], t["round"])] = t
    ids = {it["id"] for it in items}
    record = {"gate": gate}
    for k in range(1, rounds + 1):
        now = [t for (i, _, r), t in sorted(last.items()) if r == k and i in ids]
        refined = [t for t in now if t.get("refined", True)]  # rows written before the gates refined all
        before = {(t["id"], t["sample"]): t.get("reward") for t in last.values() if t["round"] == k - 1}
        delta = [t["reward"] - before[t["id"], t["sample"]] for t in refined
                 if t.get("reward") is not None and before.get((t["id"], t["sample"])) is not None]
        record[f"round_{k}"] = {"refined": len(refined), "kept": len(now) - len(refined),
                                "better": sum(d > 0.05 for d in delta) if delta else None,
                                "worse": sum(d < -0.05 for d in delta) if delta else None,
                                "refined_images": [[t["id"], t["sample"]] for t in refined]}
    return record


@torch.no_grad()
def evaluate_benchmark(args: Args, benchmark: str, data: str, refine_rounds: int = 0, checkpoint: str = "",
                       reasoning: bool = True, samples_per_prompt: int = 0, limit: int = 0,
                       refine_below: str = "", refine_only_wrong: str = "") -> str:
    """Draw a benchmark's prompts (GEdit-Bench: edit its source images), then `refine_rounds` rounds of
    reflect-and-refine; round k goes to the tree OUT/round_<k> in the layout its official scorer reads. A round
    refines every image; or those below the verifier gate (`refine_below`, `wants_refinement`); or, the
    paper's protocol, the round-0 images that the benchmark's own scorer marked wrong (`refine_only_wrong`, one
    round; round 0 is read back from OUT/round_0). A kept image is copied into the round's tree byte for byte.
    Round 0 plans first unless `reasoning` is off; refinement rounds always reflect. Sample j of an item is
    seeded in round k by (seed, j, crc32("<benchmark>/<id>"), + "/round_<k>" for k > 0): a rerun skips the
    items whose images all exist and redraws the others identically, and a gated round refines an image as an
    ungated one does. Writes OUT/manifest.json (the scorer's commands; what each round refined) and
    OUT/texts.jsonl (every round's text, whether it refined, the reward under the gate)."""
    bench = BENCHMARKS[benchmark]
    out = args.out
    K = samples_per_prompt or bench["samples"][0]
    if not out:
        raise ValueError("eval needs --out DIR (run it again with the same DIR to resume)")
    if not 1 <= K <= bench["samples"][1]:
        raise ValueError(f"--samples-per-prompt {K}: {benchmark}'s scorer reads 1 to {bench['samples'][1]} "
                         "images a prompt")
    if refine_rounds < 0 or limit < 0:
        raise ValueError("--refine-rounds and --limit cannot be negative")
    if refine_only_wrong and "wrong" not in bench:
        raise ValueError(f"--refine-only-wrong reads the output of GenEval's, DPG-Bench's and TIIF-Bench's "
                         f"scorers (the refinement the official code evaluates), not {benchmark}'s")
    if not os.path.exists(data):
        raise ValueError(f"{data}: not found (--data: the benchmark's prompt file or folder, see README)")
    items = bench["read"](data, K)[:limit or None]
    if not items:
        raise ValueError(f"{data}: no prompts")
    seeds = {it["id"]: [zlib.crc32(f"{benchmark}/{it['id']}{f'/round_{k}' if k else ''}".encode())
                        for k in range(refine_rounds + 1)] for it in items}
    trees = [os.path.join(out, f"round_{k}") for k in range(refine_rounds + 1)]
    gate = (f"only_wrong={os.path.abspath(refine_only_wrong)}" if refine_only_wrong else
            f"below={refine_below}" if refine_below else "all")
    rows = {}  # the gate's DVReward questions, by prompt
    if refine_below:
        rows = {r["prompt"]: r for r in prompt_rows(args, None)}
        missing = [it["prompt"] for it in items if it["prompt"] not in rows]
        if missing:
            raise ValueError(f"--refine-below scores each image with its prompt's DVReward questions: "
                             f"{len(missing)} of the {len(items)} prompts are not in the prompt set (e.g. "
                             f"{missing[0]!r}); write them with `python reward_server.py decompose` and pass "
                             "--prompts FILE")
        if not (args.reward_url or args.preset == "toy"):
            raise ValueError("--refine-below needs a reward server: --reward-url")
    wrong = None  # {(item id, j)} that the scorer marked wrong in round 0
    if refine_only_wrong:
        absent = [p for it in items for p in it["images"] if not os.path.exists(os.path.join(trees[0], p))]
        if absent:
            raise ValueError(f"{trees[0]} misses {len(absent)} image(s) (e.g. {absent[0]}): --refine-only-wrong "
                             "refines the round 0 that the scorer judged; draw and score it first (this command "
                             "without --refine-rounds and --refine-only-wrong)")
        if not os.path.exists(refine_only_wrong):
            raise ValueError(f"{refine_only_wrong}: not found (--refine-only-wrong: the scorer's results)")
        wrong = bench["wrong"](refine_only_wrong, items, K)
    todo = [it for it in items
            if not all(os.path.exists(os.path.join(t, p)) for t in trees for p in it["images"])]
    arguments = {"benchmark": benchmark, "data": os.path.abspath(data), "checkpoint": checkpoint and
                 os.path.abspath(checkpoint), "reasoning": reasoning, "samples_per_prompt": K,
                 **dataclasses.asdict(args), "refine_rounds": refine_rounds, "limit": limit,
                 "refine_below": refine_below, "refine_only_wrong": refine_only_wrong and
                 os.path.abspath(refine_only_wrong)}
    arguments.pop("reward_token")  # a secret; the server's address and patience may change between runs too
    manifest_path = os.path.join(out, "manifest.json")
    free = ("refine_rounds", "limit", "out", "device", "reward_url", "reward_patience", "refine_below",
            "refine_only_wrong")
    gates = {}  # each refinement tree's gate: a tree never mixes images refined under two
    if os.path.exists(manifest_path):  # never mix two settings' images in one tree
        with open(manifest_path) as f:
            old_manifest = json.load(f)
        old = old_manifest["arguments"]
        diff = sorted(k for k in old.keys() | arguments.keys()
                      if k not in free + ("reward_token",) and old.get(k) != arguments.get(k))
        if diff:
            changed = ", ".join(f"{k}={old.get(k)!r} there, {arguments.get(k)!r} here" for k in diff)
            raise ValueError(f"{out} holds images made with other settings ({changed}): use another --out")
        gates = old_manifest.get("gates") or {f"round_{k}": "all" for k in range(1, old["refine_rounds"] + 1)}
        clash = [t for t in gates if t in [os.path.basename(x) for x in trees[1:]] and gates[t] != gate]
        if clash:
            raise ValueError(f"{out}/{clash[0]} was refined with the gate {gates[clash[0]]!r}, not {gate!r}: "
                             "use another --out")
    gates.update({os.path.basename(t): gate for t in trees[1:]})
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    commands, needs = scorer_commands(benchmark, data, trees, K, args.resolution)
    manifest = {
        "benchmark": benchmark, "checkpoint": arguments["checkpoint"] or None, "commit": commit,
        "arguments": arguments,
        "seeds": {"rule": "sample j of an item in round k: seed_torch_and_group_rng(seed, j, item seed), the "
                          "item seed crc32('<benchmark>/<id>') in round 0 (listed), crc32('<benchmark>/<id>/"
                          "round_<k>') after",
                  "items": {i: s[0] for i, s in seeds.items()}},
        "counts": {"prompts": len(items), "samples_per_prompt": K, "rounds": len(trees),
                   "images_per_round": sum(len(it["images"]) for it in items),
                   "already_done": len(items) - len(todo), "drawn": 0},
        "trees": [os.path.basename(t) for t in trees], "gates": gates,
        "scorer": {"repository": bench["repo"], "set": drawn_set(benchmark, data), "needs": needs,
                   "commands": commands},
    }
    check_models(args, out)
    os.makedirs(out, exist_ok=True)
    save_atomic(manifest_path, json.dumps(manifest, indent=1))
    server = client = None
    if todo:
        policy = load_policy(args, out)
        if checkpoint:
            load_checkpoint(checkpoint, policy, None, args)
        if refine_below:
            server, client = connect_reward_server(args)
    try:
        for it in tqdm(todo, desc=benchmark, unit="prompt"):
            source = None
            if it["source"]:
                try:
                    source = Image.open(it["source"]).convert("RGB")
                except OSError as e:
                    raise ValueError(f"{it['source']}: not a readable image ({e})") from None
            row = rows.get(it["prompt"])
            judged_0 = read_round(trees[0], it, K) if wrong is not None else None  # the scored round 0
            rounds = [[] for _ in trees]  # rounds[k][j]: sample j after round k
            kept = [[] for _ in trees]  # kept[k][j]: round k kept it unchanged
            texts = []
            for j in range(K):
                image, scores = source, None
                # every round of an edit at the source's aspect ratio (the scorer resizes it to the source's)
                size = policy.renderer.edit_size(source) if source is not None else None
                for k in range(len(trees)):
                    gen = seed_torch_and_group_rng(args, j, seeds[it["id"]][k])
                    refined = None if k == 0 else (
                        (it["id"], j) in wrong if wrong is not None else wants_refinement(refine_below, scores))
                    if k == 0 and judged_0 is not None:
                        image, text = judged_0[j], None
                    elif k == 0 and source is None:  # text-to-image: plan (unless --no-reasoning), then draw
                        image, text = draw(policy, args, it["prompt"], gen, reasoning)
                    elif k == 0 or refined:
                        # GEdit-Bench's round 0 edits the source image; a refinement reflects on the last one
                        image, text = refine(policy, args, it["prompt"], image, gen, reasoning or k > 0,
                                             EDIT_INSTRUCTION if k == 0 else "", size)
                    else:
                        text = ""  # kept: the gate passed it, or the scorer found it right
                    if row is not None and refined is not False:
                        scores = client.submit([image], *([q] for q in questions(row))).result()
                    rounds[k].append(image)
                    kept[k].append(refined is False)
                    if text is not None:
                        texts.append({"id": it["id"], "sample": j, "round": k, "text": text, "refined": refined,
                                      "reward": scores and scores["rewards"][0]})
            for k, (tree, images) in enumerate(zip(trees, rounds)):  # the images last: then an item is done
                if k == 0 and judged_0 is not None:
                    continue  # round 0 stays as the scorer judged it
                for path, text in it["meta"].items():
                    save_atomic(os.path.join(tree, path), text)
                if source is not None:  # GEdit-Bench's scorer reads the source beside the edit
                    save_atomic(os.path.join(tree, it["images"][0][:-len(".png")] + "_SRCIMG.png"), source)
                grid = len(it["images"]) < K  # DPG-Bench: one grid of the K samples
                for j, (path, image) in enumerate(zip(it["images"], [tile(images)] if grid else images)):
                    if all(kept[k]) if grid else kept[k][j]:  # the previous round's file, byte for byte
                        with open(os.path.join(trees[k - 1], path), "rb") as f:
                            image = f.read()
                    save_atomic(os.path.join(tree, path), image)
            with open(os.path.join(out, "texts.jsonl"), "a", encoding="utf-8") as f:
                f.writelines(json.dumps(t) + "\n" for t in texts)
    finally:
        if client is not None:
            client.close()
        if server is not None:
            server.terminate()
    manifest["counts"]["drawn"] = len(todo)
    manifest["refinement"] = refinement_record(os.path.join(out, "texts.jsonl"), items, refine_rounds, gate)
    save_atomic(manifest_path, json.dumps(manifest, indent=1))
    print(f"{benchmark}: {len(todo)} prompts drawn, {len(items) - len(todo)} already done, {len(trees)} "
          f"round(s) in {out}/round_*")
    for k in range(1, refine_rounds + 1):
        r = manifest["refinement"][f"round_{k}"]
        verdict = "" if r["better"] is None else f" (by the verifier: {r['better']} better, {r['worse']} worse)"
        print(f"  round {k} ({gate}): refined {r['refined']} images{verdict}, kept {r['kept']} unchanged")
    print(f"score them in a clone of {bench['repo']} (it needs {manifest['scorer']['needs']}), e.g. round 0:")
    for c in manifest["scorer"]["commands"]["round_0"]:
        print("  " + c)
    return out


# --------------------------------------------------------------------------------------------------
# The memory plan, the dry run and the GPU bench (random weights at real shapes)
# --------------------------------------------------------------------------------------------------


class RandomRewards:
    """--dry-run without --reward-url: seeded random scores in place of a verifier. A dry run measures
    memory and time, not learning."""

    def __init__(self):
        self.rng = random.Random(0)

    def submit(self, images: list, semantic: list, quality: list) -> Future:
        sem = [[self.rng.random() for _ in qs] for qs in semantic]
        qual = [[self.rng.random() for _ in qs] for qs in quality]
        f = Future()
        rewards = [dvreward(s, q) for s, q in zip(sem, qual)]
        f.set_result({"rewards": rewards, "semantic_scores": sem, "quality_scores": qual})
        return f

    def close(self):
        pass


def memory_plan(policy_parts: dict, args: Args, guided: bool) -> list:
    """Rows (component, parameters, GB) of the GPU memory plan for one group of G trajectories. Frozen
    weights in args.dtype; LoRA weights, grads and AdamW moments in fp32 (16 bytes a parameter); activations
    with gradient checkpointing: one saved (tokens, hidden) input per block and trained step, x2 where CFG
    runs (`guided`, the renderer's rule). Cosmos3: the cached context, keys and values per layer per sample
    and CFG branch (CosmosContext), and the generation tokens' activations (the context's too with
    --context-grad, whose understanding pass is not checkpointed: every layer's inputs and attention and MLP
    intermediates, counted as 8 hidden-sized tensors a token and layer)."""
    w = 2 if args.dtype == "bfloat16" else 4
    seen = set()  # the unified policy's shared weights are in two parts: counted in the first

    def numel(m, lora=False):  # parameters (tied ones once) and the buffers that are saved; LoRA or not
        saved = m.state_dict().keys()
        tensors = list(m.named_parameters()) + [b for b in m.named_buffers() if b[0] in saved]
        new = [t for n, t in tensors if (".lora_" in n) == lora and id(t) not in seen]
        seen.update(map(id, new))
        return sum(t.numel() for t in new)

    rows = [(name, n, n * w / 1e9) for name, n in ((k, numel(m)) for k, m in policy_parts.items())]
    lora = sum(numel(m, lora=True) for m in policy_parts.values())
    rows.append(("LoRA weights + grads + AdamW (fp32)", lora, lora * 16 / 1e9))
    part = {k.split(" ")[0]: m for k, m in policy_parts.items()}  # "reasoner", "renderer.transformer", ...
    t = part["renderer.transformer"].config
    in_context = args.task != "rt2i" and args.srr_refine != "sdedit"  # SRR's reference: as many tokens again
    cfg = guided
    if "latent_patch_size" in t:  # Cosmos3: image tokens (and the reference's) through the generation stream
        px = part["renderer.vae"].config.scale_factor_spatial * t.latent_patch_size  # pixels a token
        tokens = (args.resolution // px) ** 2 * (2 if in_context else 1)
        hidden, blocks = t.hidden_size, t.num_hidden_layers
        kv = 2 * blocks * args.max_text_tokens * t.num_key_value_heads * t.head_dim * w  # bytes a sample
        rows.append((f"cached context (K/V, {blocks} layers{', CFG' if cfg else ''})", None,
                     (2 if cfg else 1) * args.group_size * kv / 1e9))
        if args.context_grad:
            context = (2 if cfg else 1) * args.group_size * args.max_text_tokens * hidden * w * blocks * 8
            rows.append(("context activations (--context-grad)", None, context / 1e9))
    else:  # tokens: image patches (klein in context: the reference's too) + text (SD3: CLIP's 77 + T5's)
        klein = "num_single_layers" in t
        tokens = (args.resolution // 16) ** 2 * (2 if in_context and klein else 1) + args.max_text_tokens
        tokens += 0 if klein else 77
        hidden = t.num_attention_heads * t.attention_head_dim
        blocks = t.num_layers + t.num_single_layers if klein else t.num_layers
    act = (2 if cfg else 1) * args.group_size * tokens * hidden * w * blocks * args.sde_window
    rows.append((f"renderer activations ({args.sde_window} trained steps{', CFG' if cfg else ''})", None,
                 act / 1e9))
    r = part["reasoner"].config.text_config
    seq = 128 + args.max_new_tokens
    # saved layer inputs + fp32 logits and their log-softmax
    act = (args.group_size * seq * r.hidden_size * w * r.num_hidden_layers
           + 2 * args.group_size * args.max_new_tokens * r.vocab_size * 4)
    rows.append(("reasoner activations (+ fp32 logits)", None, act / 1e9))
    return rows


def random_policy(args: Args, device: torch.device, layers: int = 0) -> Policy:
    """The preset's reasoner and renderer at their real shapes (SHAPES), random weights built straight on
    `device` in args.dtype (the meta device allocates nothing), with LoRA. Nothing downloads. layers > 0 keeps
    that many of the text model's layers (and so of both Cosmos3 streams'): a CPU-sized slice of the real
    widths."""
    shapes = SHAPES[args.preset]
    unified = args.policy == "unified"
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, args.dtype))  # build straight in the weights' dtype, on the device
    try:
        with torch.device(device):
            text = shapes["text"]
            if unified and args.preset == "toy":
                text = {**text, **shapes["unified_text"]}
            if layers:
                text = {**text, "num_hidden_layers": layers}
            edge = args.preset == "cosmos3-edge"
            processor, model = (make_edge_vlm if edge else make_vlm)(text, shapes["vision"], args.resolution)
            if unified:  # the generator's understanding stream has the reasoner's text model's shapes
                pipe = make_cosmos3(model.config.text_config.to_dict(),
                                    shapes.get("wan_vae", SHAPES["toy"]["wan_vae"]), processor.tokenizer)
            else:
                pipe = make_klein(shapes) if args.preset in ("klein", "toy") else make_sd3(shapes)
    finally:
        torch.set_default_dtype(default_dtype)
    torch.manual_seed(args.seed)
    reasoner = Reasoner(processor, model, device, args)  # adds LoRA, then the renderer adds its own
    if unified:
        return Policy(reasoner, CosmosRenderer(pipe, device, args, reasoner.model), device)
    renderer = (KleinRenderer if args.preset in ("klein", "toy") else SD3Renderer)(pipe, device, args)
    return Policy(reasoner, renderer, device)


def dry_run(args: Args):
    """--dry-run: the preset's models at real shapes from SHAPES (meta device without a GPU: no memory at
    all), their parameter counts and the memory plan; with a GPU, random weights and one full step."""
    cuda = torch.cuda.is_available() and args.device != "cpu"
    run_step = cuda or args.preset == "toy"  # a real-size step needs a GPU; the toy one runs anywhere
    device = torch.device("cuda" if cuda else "cpu" if run_step else "meta")
    policy = random_policy(args, device)
    model = policy.reasoner.model
    pipe = policy.renderer.pipe
    parts = {"reasoner": model, "renderer.transformer": pipe.transformer, "renderer.vae": pipe.vae}
    if isinstance(policy.renderer, CosmosRenderer):  # one network: the reasoner is its understanding stream
        parts = {"reasoner (understanding stream + vision)": model,
                 "renderer.transformer (generation stream)": pipe.transformer,
                 "renderer.vae (Wan 2.2)": pipe.vae}
    elif isinstance(policy.renderer, KleinRenderer):
        parts["renderer.text_encoder (Qwen3)"] = pipe.text_encoder
    else:
        parts.update({"renderer.text_encoder (CLIP-L)": pipe.text_encoder,
                      "renderer.text_encoder_2 (CLIP-G)": pipe.text_encoder_2,
                      "renderer.text_encoder_3 (T5)": pipe.text_encoder_3})
    rows = memory_plan(parts, args, policy.renderer.guided(None))
    where = "random weights on " + torch.cuda.get_device_name() if cuda else "meta device"
    print(f"--dry-run of the {args.preset} preset ({where}"
          f"), G={args.group_size}, {args.resolution}px, W={args.sde_window}, {args.dtype}")
    for name, n, gb in rows:
        print(f"  {name:<48} {'' if n is None else f'{n / 1e9:7.3f} B params':>16} {gb:8.2f} GB")
    total = sum(r[2] for r in rows)
    print(f"  {'total (estimate)':<48} {'':>16} {total:8.2f} GB")
    per_group = sum(gb for name, _, gb in rows if "activations" in name or "context" in name)  # grows with G
    for card in (80, 48, 24):
        g_max = int((card * 0.9 - (total - per_group)) / (per_group / args.group_size))  # 10% headroom
        if g_max >= 2:
            print(f"  on a {card} GB card: fits G up to {g_max} (this plan's G is {args.group_size})")
        else:
            print(f"  on a {card} GB card: the frozen weights alone do not fit (no group fits)")
    if not run_step:
        print("no GPU here: nothing was allocated; on a GPU, --dry-run also runs one full step with random "
              "weights")
        return rows
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    out = train(dataclasses.replace(args, steps=1, save_every=0, eval_every=0), policy=policy)
    if cuda:
        print(f"peak GPU memory of one step: {torch.cuda.max_memory_allocated() / 1e9:.2f} GB")
    print(f"one step done: {out}/metrics.jsonl")
    return rows


@torch.no_grad()
def stock_pipeline(renderer: Renderer, cond: tuple, x_T: torch.Tensor, steps: int) -> torch.Tensor:
    """The diffusers pipeline itself (StableDiffusion3Pipeline, Flux2KleinPipeline or Cosmos3OmniPipeline)
    from our x_T and text embeddings (Cosmos3: texts), at our steps and CFG; its final latents in our
    sampler's space. Text-to-image only."""
    G = len(x_T)
    res = renderer.args.resolution
    pipe = renderer.pipe
    if isinstance(renderer, CosmosRenderer):  # one sample a call; its UniPC at first order is our Euler step
        from diffusers import UniPCMultistepScheduler

        kept = pipe.scheduler
        pipe.scheduler = UniPCMultistepScheduler.from_config(kept.config, solver_order=1,
                                                             disable_corrector=list(range(steps)))
        try:
            return torch.stack([pipe(text, num_frames=1, height=res, width=res, num_inference_steps=steps,
                                     guidance_scale=renderer.args.guidance_scale, latents=x[None, :, None],
                                     output_type="latent").video.reshape(x.shape).float()
                                for text, x in zip(cond[0], x_T)])
        finally:
            pipe.scheduler = kept
    common = dict(latents=x_T.to(renderer.dtype), num_inference_steps=steps, height=res, width=res,
                  guidance_scale=renderer.args.guidance_scale, output_type="latent",
                  prompt_embeds=cond[0][G:], negative_prompt_embeds=cond[0][:G])
    if isinstance(renderer, SD3Renderer):
        pooled = dict(pooled_prompt_embeds=cond[1][G:], negative_pooled_prompt_embeds=cond[1][:G])
        return pipe(**pooled, **common).images.float()
    z = pipe(max_sequence_length=renderer.args.max_text_tokens, text_encoder_out_layers=renderer.text_layers,
             **common).images.float()  # un-normalized, unpatchified: back to the sampler's space
    return (pipe._patchify_latents(z) - renderer.bn_mean) / renderer.bn_std


def bench(args: Args, verifier: str = "", repeats: int = 3, layers: int = 0, train_step: bool = True) -> dict:
    """`bench`: the figures of the README's performance section, at the preset's real shapes with random
    weights (nothing downloads). Run it on a GPU with --preset klein, sd35 or cosmos3; on the CPU the toy
    preset runs the same script end to end in about a minute, to check it before spending GPU time, and
    `--layers 1 --no-train-step` a slice of a real preset (its widths, one layer). Measures:
    1. on-policy exactness: group_loss on a fresh rollout with non-zero LoRA weights, computed exactly as the
       first update computes it (grad on, train mode, checkpointing): max |ratio - 1| of the text tokens and
       of the trained image steps, and the image clip fraction;
    2. the rollout sampler against the stock diffusers pipeline (StableDiffusion3Pipeline, Flux2KleinPipeline
       or Cosmos3OmniPipeline) from the same x_T, texts (the prompt and a reasoning of --max-new-tokens
       words), steps and CFG: median time of `repeats` alternated runs and their ratio; and, both as ODEs,
       their latents' largest difference;
    3. (train_step) two training steps with a reward server on the same device (a random verifier of
       `verifier`'s shape, or --reward-url): the second step's time split, the share spent waiting for
       rewards, the peak memory.
    Returns the figures."""
    cuda = torch.cuda.is_available() and args.device != "cpu"
    device = torch.device("cuda" if cuda else "cpu")
    policy = random_policy(args, device, layers)
    renderer = policy.renderer
    G = args.group_size
    with torch.no_grad():  # non-zero LoRA B: a rollout that ran with LoRA off would show in the ratios
        for m in [*policy.reasoner.model.modules(), *renderer.transformer.modules()]:
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_(0, 1e-2)
    toy_rows = [r for r in TOY_WORLD_PROMPTS if r["split"] == "train"]
    rows = load_prompts(args.prompts, "train") if args.prompts else toy_rows
    gen = seed_torch_and_group_rng(args, 0, 0)
    sigmas = renderer.sigmas(args.num_steps)
    name = torch.cuda.get_device_name() if cuda else "cpu"
    sliced = f", {layers} layer(s) of each stream" if layers else ""
    print(f"bench: {args.preset} preset ({args.policy}{sliced}), random weights on {name}, {args.dtype}, "
          f"G={G}, {args.resolution}px, T={args.num_steps}, W={args.sde_window}, {args.max_new_tokens} new "
          f"tokens at most", flush=True)

    def timed(fn):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t

    # 1. On-policy exactness of the first update (Sec. 3: the ratio must start at exactly 1)
    g = rollout_group(policy, rows[0], "rt2i", args, gen, RandomRewards(), sigmas)
    g.advantages = torch.ones(G)
    logp_text, logp_img, _ = group_logps(policy, g, args)  # grad on, as the first update computes them
    r_text = (logp_text.detach() - g.text.old_logp).exp()[g.text.mask > 0]  # the generated tokens' ratios
    r_img = (logp_img.detach() - g.image.old_logp).exp()  # (G, W)
    _, image_clipfrac = image_loss(logp_img.detach(), g.image.old_logp, g.advantages, args.image_clip)
    fig = {"text_ratio_dev": (r_text - 1).abs().max().item(),
           "image_ratio_dev": (r_img - 1).abs().max().item(),
           "image_clipfrac": float(image_clipfrac)}
    print(f"1. on-policy, first update of a fresh rollout: text max |r - 1| {fig['text_ratio_dev']:.2e} "
          f"(goal < 1e-3), image max |r - 1| {fig['image_ratio_dev']:.2e} "
          f"(goal < {args.image_clip / 10:.0e}, a tenth of --image-clip), "
          f"image_clipfrac {fig['image_clipfrac']:.3f} (goal 0)", flush=True)
    del g, logp_text, logp_img

    # 2. Our rollout sampler against the stock pipeline, same inputs: the prompt and the longest reasoning
    words = [w for w in TOY_WORDS if w.isalpha()]
    reasoning = [" ".join(random.Random(i).choices(words, k=args.max_new_tokens)) for i in range(G)]
    texts = [renderer_text(rows[0]["prompt"], y) for y in reasoning]
    cond = renderer.encode(texts)
    x_T = renderer.noise(G, gen)
    ours = []
    theirs = []
    # alternated, so that both see the same machine load; the first pair warms up
    for _ in range(repeats + 1):
        ours.append(timed(lambda: render(renderer, cond, x_T, sigmas, range(args.sde_window),
                                         args.noise_level, gen)))
        theirs.append(timed(lambda: stock_pipeline(renderer, cond, x_T, args.num_steps)))
    ode = render(renderer, cond, x_T, sigmas, range(0), 0.0)[0]
    diff = (ode - stock_pipeline(renderer, cond, x_T, args.num_steps)).abs().max().item()
    fig.update(sampler_s=statistics.median(ours[1:]), pipeline_s=statistics.median(theirs[1:]),
               ode_max_diff=diff)
    fig["sampler_ratio"] = fig["sampler_s"] / fig["pipeline_s"]
    print(f"2. rollout sampler (SDE window, keeps latents and log-probs) {fig['sampler_s']:.3f} s, "
          f"{type(renderer.pipe).__name__} {fig['pipeline_s']:.3f} s per group of {G} (median of {repeats}): "
          f"ratio {fig['sampler_ratio']:.3f} (goal <= 1.1); as ODEs, max |latents - diffusers'| {diff:.1e}",
          flush=True)

    if not train_step:
        return fig
    # 3. Training steps with the reward server on the same device (Sec. 4.3: scoring overlaps sampling)
    server = None
    url = args.reward_url
    if not url:
        server, url = start_reward_server(verifier or ("random:small" if args.preset == "toy" else
                                                       "random:qwen3-vl-8b"), device.type)
    try:
        with tempfile.TemporaryDirectory() as out:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            train(dataclasses.replace(args, steps=2, out=out, reward_url=url, resume="", save_every=0,
                                      eval_every=0,
                                      sample_every=0), policy=policy)
            with open(os.path.join(out, "metrics.jsonl")) as f:
                row = [json.loads(line) for line in f][-1]  # the second step: the first one warms up
    finally:
        if server is not None:
            server.terminate()
    fig.update({k: row[k] for k in row if k.startswith("time_")})
    fig["reward_wait_share"] = row["time_reward_wait"] / row["time_step"]
    split = ", ".join(f"{k} {row['time_' + k]:.2f} s ({row['time_' + k] / row['time_step']:.0%})"
                      for k in ("reason", "render", "reward_wait", "train"))
    print(f"3. one training step ({args.groups_per_step} groups of {G}, {args.updates_per_rollout} optimizer "
          f"updates, verifier on the same device): {row['time_step']:.2f} s = {split}; waiting for rewards "
          f"{fig['reward_wait_share']:.1%} of the step (goal < 5%)")
    if cuda:
        free, total = torch.cuda.mem_get_info()
        fig.update(peak_allocated_gb=torch.cuda.max_memory_allocated() / 1e9,
                   peak_reserved_gb=torch.cuda.max_memory_reserved() / 1e9,
                   device_used_gb=(total - free) / 1e9)
        print(f"   peak GPU memory of the trainer: {fig['peak_allocated_gb']:.1f} GB allocated, "
              f"{fig['peak_reserved_gb']:.1f} GB reserved (goal: fits 80 GB); the device holds "
              f"{fig['device_used_gb']:.1f} GB now, reward server included")
    return fig


if __name__ == "__main__":
    main()
