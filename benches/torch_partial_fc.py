#!/usr/bin/env python3
"""PyTorch baseline for the whole-step benchmark: the published Partial FC algorithm
(insightface `PartialFC_V2` semantics, one rank) written with torch ops, at the configuration of
benches/cuda_kernels.rs `step_1M_b1024_d512_r0.1`: shard of 1M classes, gathered batch 1024,
d 512, r 0.1, ArcFace (s 64, m 0.5), SGD momentum 0.9, weight decay 5e-4, lr 0.1.

One step, as published:
  * sampling: positives = unique(labels); perm = torch.rand(num_local); perm[positives] = 2.0;
    index = topk(perm, num_sample).indices.sort(); labels = searchsorted(index, labels);
    weight = self.weight[index]  (a gather, so autograd's grad of the full weight is dense);
  * normalize embeddings and sampled weights, linear, clamp(-1, 1) (under autocast for bf16,
    logits back to f32 as published);
  * ArcFace under no_grad: arccos of the logits, + m on the target, cos, times s;
  * distributed cross entropy with world size 1 (the published DistCrossEntropyFunc: max, exp,
    sum, div, gather; loss = mean(-log(clamp_min(p, 1e-30))); backward (p - onehot) / batch),
    as a torch.autograd.Function so autograd chains it to normalize/linear/gather;
  * torch.optim.SGD(momentum 0.9, weight_decay 5e-4) on the full (dense) weight, as published.
    Note: the published update is dense (it reads and writes the whole 1M x 512 weight, grad and
    momentum every step); ours is sparse (sampled rows only), which is part of what is compared.

Time per step: CUDA events around each of the measured iterations after warm-up (median and
mean). Peak memory: torch.cuda.max_memory_allocated() over setup and the measured steps (weight,
grad, momentum, activations), and the same after resetting the peak once the weight, grad and
momentum exist (that is, the peak of a steady-state step).

    python3 benches/torch_partial_fc.py [--classes 1048576 --batch 1024 --dim 512 --iters 20]
"""
import argparse
import math
import statistics

import torch


class DistCrossEntropyFunc(torch.autograd.Function):
    """The published DistCrossEntropyFunc with world size 1 (the all-reduces are identities)."""

    @staticmethod
    def forward(ctx, logits, label):
        batch_size = logits.size(0)
        max_logits, _ = torch.max(logits, dim=1, keepdim=True)
        logits.sub_(max_logits)
        logits.exp_()
        sum_logits_exp = torch.sum(logits, dim=1, keepdim=True)
        logits.div_(sum_logits_exp)
        index = torch.where(label != -1)[0]
        loss = torch.zeros(batch_size, 1, device=logits.device)
        loss[index] = logits[index].gather(1, label[index])
        ctx.save_for_backward(index, logits, label)
        return loss.clamp_min_(1e-30).log_().mean() * (-1)

    @staticmethod
    def backward(ctx, loss_gradient):
        index, logits, label = ctx.saved_tensors
        batch_size = logits.size(0)
        one_hot = torch.zeros(size=[index.size(0), logits.size(1)], device=logits.device)
        one_hot.scatter_(1, label[index], 1)
        logits[index] -= one_hot
        logits.div_(batch_size)
        return logits * loss_gradient.item(), None


def arcface(logits, labels, s=64.0, m=0.5):
    """The published CombinedMarginLoss with m1 = 1, m2 = m, m3 = 0 (ArcFace)."""
    index_positive = torch.where(labels != -1)[0]
    target_logit = logits[index_positive, labels[index_positive].view(-1)]
    with torch.no_grad():
        target_logit.arccos_()
        logits.arccos_()
        final_target_logit = target_logit + m
        logits[index_positive, labels[index_positive].view(-1)] = final_target_logit
        logits.cos_()
    return logits * s


class PartialFC(torch.nn.Module):
    def __init__(self, num_local, dim, sample_rate, device):
        super().__init__()
        self.num_local = num_local
        self.class_start = 0
        self.num_sample = int(sample_rate * num_local)
        self.weight = torch.nn.Parameter(torch.normal(0, 0.01, (num_local, dim), device=device))

    def sample(self, labels, index_positive):
        with torch.no_grad():
            positive = torch.unique(labels[index_positive], sorted=True)
            if self.num_sample - positive.size(0) >= 0:
                perm = torch.rand(size=[self.num_local], device=labels.device)
                perm[positive] = 2.0
                index = torch.topk(perm, k=self.num_sample)[1]
                index = index.sort()[0]
            else:
                index = positive
            labels[index_positive] = torch.searchsorted(index, labels[index_positive])
        return self.weight[index]

    def forward(self, embeddings, labels, autocast_dtype):
        labels = labels.clone().view(-1, 1)
        index_positive = (self.class_start <= labels) & (labels < self.class_start + self.num_local)
        labels[~index_positive] = -1
        labels[index_positive] -= self.class_start
        weight = self.sample(labels, index_positive)
        with torch.autocast("cuda", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            norm_embeddings = torch.nn.functional.normalize(embeddings)
            norm_weight = torch.nn.functional.normalize(weight)
            logits = torch.nn.functional.linear(norm_embeddings, norm_weight)
        if autocast_dtype is not None:
            logits = logits.float()
        logits = logits.clamp(-1, 1)
        logits = arcface(logits, labels)
        return DistCrossEntropyFunc.apply(logits, labels)


def run(name, args, autocast_dtype):
    dev = torch.device("cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    module = PartialFC(args.classes, args.dim, args.rate, dev)
    opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    i = torch.arange(args.batch * args.dim, device=dev)
    # The same inputs as the Rust bench.
    x = (((i * 31) % 997).float() - 498.0) / 498.0
    x = x.view(args.batch, args.dim).requires_grad_(True)
    labels = (torch.arange(args.batch, device=dev) * 1021) % args.classes

    def step():
        opt.zero_grad()
        x.grad = None
        loss = module(x, labels, autocast_dtype)
        loss.backward()
        opt.step()
        return loss

    for _ in range(args.warmup):
        loss = step()
    torch.cuda.synchronize()
    peak_with_setup = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss = step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    steady_peak = torch.cuda.max_memory_allocated()
    peak = max(peak_with_setup, steady_peak)
    med, mean = statistics.median(times), statistics.mean(times)
    print(
        f"torch {name}: step median {med:.3f} ms, mean {mean:.3f} ms, min {min(times):.3f} ms "
        f"({args.iters} steps after {args.warmup} warm-up); loss {loss.item():.4f}; "
        f"peak memory {peak / 2**20:.1f} MiB (steady-state step {steady_peak / 2**20:.1f} MiB)"
    )
    assert math.isfinite(loss.item()), "non-finite loss"
    del module, opt, x
    return med, peak


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--classes", type=int, default=1 << 20)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--rate", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("skipped: no CUDA device for torch")
        return
    print(
        f"== PyTorch PartialFC_V2 baseline: torch {torch.__version__}, {torch.cuda.get_device_name()}, "
        f"shard {args.classes}, batch {args.batch}, d {args.dim}, r {args.rate}, dense SGD momentum"
    )
    results = {}
    for name, dtype in (("f32", None), ("bf16_autocast", torch.bfloat16)):
        results[name] = run(name, args, dtype)
    print("== summary (torch, per step)")
    for name, (med, peak) in results.items():
        print(f"  {name:14s} {med:8.3f} ms   peak {peak / 2**20:9.1f} MiB")


if __name__ == "__main__":
    main()
