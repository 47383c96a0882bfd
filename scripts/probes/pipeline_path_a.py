"""Path A probe: megatron-core 1F1B (get_forward_backward_func) over 2 pipeline stages on CPU/gloo,
with DeepSpeed ZeRO-1 as the optimizer (engine.step only; megatron's schedule owns forward/backward).

  PP=2: OMP_NUM_THREADS=1 python3 -m torch.distributed.run --standalone --nproc-per-node=2 scripts/probes/pipeline_path_a.py
  PP=1: OMP_NUM_THREADS=1 python3 scripts/probes/pipeline_path_a.py            (one process; the reference)
  cmp : python3 scripts/probes/pipeline_path_a.py --compare                    (also done by whichever run ends last)

Both runs build the full model at PP=1 from one seed (the project's builder), the PP=1 run saves its
state_dict to /tmp/pp/init.pt, and each PP stage loads its slice of the same weights (the PP=2 run
checks its own full build equals init.pt when that file exists). Dropout is 0, so the runs are
deterministic; what differs is only the order of float operations.

PP=1 runs two references in one process:
  ref_engine : the project's TrainStep way (engine(...) forward, engine.backward per micro-batch,
               engine.step per micro-batch, GAS = micro-batches, ZeRO-1);
  ref_sched  : megatron's forward_backward_no_pipelining + the same DeepSpeed integration as PP=2.
Env knobs (non-default variants write no result files; see notes.md for what each showed):
  PROBE_SYNC=config          no torch.cuda.synchronize shim; TransformerConfig.batch_p2p_sync=False instead
  PROBE_SKIP_SHIM=5|6|7      leave one extra shim out (shows the CUDA call it covers)
  PROBE_DS_MODE=managed_nored | managed_allreduce   DeepSpeed's default (managed) accumulation, GAS=1,
                             engine.step() alone / after engine.allreduce_gradients()
  PROBE_MARK_REPLICATED=0    the last stage's tied copy counted in the norm too
  PROBE_MPU=project          model-parallel group = TP only (mlra_mega.distributed.DeepSpeedMPU today)
  PROBE_ZERO=0               ZeRO-0 instead of ZeRO-1
  PROBE_MODE=dp2             2 processes at PP=1, DP=2 (ZeRO-1 really sharded), 2 micro-batches per rank
  PROBE_STEPS, PROBE_CLIP, PROBE_TIE=0
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import socket
import sys
import time
import types
from functools import partial
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
OUT = Path("/tmp/pp")

import torch
import torch.distributed as dist

torch.set_num_threads(1)

SEED = 1234
HIDDEN, HEADS, LAYERS, SEQ, VOCAB = 64, 4, 4, 32, 600
MBS, NMB = 2, 4
STEPS = int(os.environ.get("PROBE_STEPS", 3))
LR, CLIP = 1e-3, float(os.environ.get("PROBE_CLIP", 1.0))
TIE = os.environ.get("PROBE_TIE", "1") == "1"
SYNC_MODE = os.environ.get("PROBE_SYNC", "shim")  # shim | config
SKIP_SHIM = os.environ.get("PROBE_SKIP_SHIM", "")  # 5 | 6 | 7: leave that extra shim out (to see why it is needed)
DS_MODE = os.environ.get("PROBE_DS_MODE", "unmanaged")  # unmanaged | managed_nored | managed_allreduce
MPU_KIND = os.environ.get("PROBE_MPU", "pipe")  # pipe | project (today's DeepSpeedMPU: model-parallel = TP only)
ZERO = int(os.environ.get("PROBE_ZERO", 1))
MARK_REPLICATED = os.environ.get("PROBE_MARK_REPLICATED", "1") == "1"
MODE = os.environ.get("PROBE_MODE", "pp")  # pp | dp2 (world 2 at PP=1, DP=2: 2 micro-batches per rank)
DEFAULT = ZERO == 1 and MPU_KIND == "pipe" and not SKIP_SHIM and DS_MODE == "unmanaged" and MARK_REPLICATED and SYNC_MODE == "shim" and TIE


def log(*a, **kw):
    r = dist.get_rank() if dist.is_initialized() else 0
    print(f"[rank {r}]", *a, flush=True, **kw)


# ------------------------------------------------------------------------------------------ shims

def apply_shims() -> list[str]:
    """mlra_mega.cpu.apply() (RNG tracker, current_device, causal mask, DeepSpeed shm op) + the
    pipeline ones this probe needs. Returns the names of the extra patches."""
    from mlra_mega import cpu

    cpu.apply()
    extra = []

    # (5) pipeline_parallel/schedules.py: total_num_tokens = torch.zeros([], ..., device="cuda") in
    # all three schedules (no-pipelining, 1F1B, interleaved). A proxy of `torch` for that module
    # only, redirecting device="cuda" of torch.zeros to the CPU.
    from megatron.core.pipeline_parallel import schedules

    class _CpuTorchForSchedules(types.ModuleType):
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def zeros(*args, device=None, **kwargs):
            if device is not None and torch.device(device).type == "cuda":
                device = "cpu"
            return torch.zeros(*args, device=device, **kwargs)

    if SKIP_SHIM != "5":
        schedules.torch = _CpuTorchForSchedules("torch")
        extra.append("megatron.core.pipeline_parallel.schedules.torch (proxy: torch.zeros device='cuda' -> cpu)")

    # (6) pipeline_parallel/p2p_communication.py: torch.cuda.synchronize() after batch_isend_irecv
    # (when config.batch_p2p_comm and config.batch_p2p_sync, both True by default) and in
    # _communicate_shapes (variable_seq_lengths). Without CUDA it raises. On gloo the requests
    # were waited on just before, so a no-op is exact. Alternative: config batch_p2p_sync=False.
    if SYNC_MODE == "shim" and SKIP_SHIM != "6":
        torch.cuda.synchronize = lambda device=None: None
        extra.append("torch.cuda.synchronize (no-op)")

    # (7) models/common/language_module/language_module.py, setup_embeddings_and_output_layer:
    # with tied embeddings and PP>1, the first/last stage run `weight.data = weight.data.cuda()`
    # before all-reducing the shared weight over the embedding group -> AssertionError "Torch not
    # compiled with CUDA enabled" on the stage holding it. Same function with the .cuda() skipped.
    from megatron.core.models.common.language_module import language_module as lm

    orig_setup = lm.LanguageModule.setup_embeddings_and_output_layer
    orig_in_group = lm.LanguageModule._is_in_embd_group

    def cpu_setup_embeddings_and_output_layer(self):
        self._is_in_embd_group = lambda: False  # instance attr: skip megatron's .cuda() + all_reduce
        try:
            orig_setup(self)
        finally:
            del self._is_in_embd_group
        shares = self.share_embeddings_and_output_weights or getattr(self.config, "mtp_num_layers", 0)
        if shares and self.config.pipeline_model_parallel_size > 1 and dist.is_initialized() \
                and orig_in_group(self):
            dist.all_reduce(self.shared_embedding_or_output_weight().data, group=self.embd_group)

    if SKIP_SHIM == "7":
        return extra
    lm.LanguageModule.setup_embeddings_and_output_layer = cpu_setup_embeddings_and_output_layer
    extra.append("megatron.core.models.common.language_module.language_module."
                 "LanguageModule.setup_embeddings_and_output_layer (skip .cuda() of the shared weight)")
    return extra


# ------------------------------------------------------------------------------------------ setup

def init_dist() -> tuple[int, int]:
    if "RANK" not in os.environ:  # plain python: a world of one
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def model_cfg():
    from mlra_mega.config import ModelConfig

    return ModelConfig(num_layers=LAYERS, hidden_size=HIDDEN, num_heads=HEADS, vocab_size=VOCAB,
                       seq_length=SEQ, attention_backend="local", fusions="off", hidden_dropout=0.0,
                       attention_dropout=0.0, tie_embeddings=TIE)


def seed_all(seed):
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def build_full_init_state(mcfg) -> dict[str, torch.Tensor]:
    """The full model at PP=1 from SEED (the project's builder), as a tensor state_dict."""
    from megatron.core import parallel_state as ps
    from mlra_mega.model.build import build_model

    ps.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    seed_all(SEED)
    full = build_model(mcfg)
    sd = {k: v.detach().clone() for k, v in full.state_dict().items() if isinstance(v, torch.Tensor)}
    ps.destroy_model_parallel()
    return sd


def build_stage(mcfg, pp: int):
    """This rank's stage: GPTModel(pre_process=first, post_process=last) holding only its layers."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
    from mlra_mega.model.build import transformer_config
    from mlra_mega.model.embedding import GPTModelWithEmbedding
    from mlra_mega.model.norm import LayerNorm
    from mlra_mega.model.specs import layer_spec

    tcfg = transformer_config(mcfg)
    if pp > 1:
        tcfg = dataclasses.replace(tcfg, pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32,
                                   batch_p2p_sync=(SYNC_MODE == "shim"))
    n_local = get_num_layers_to_build(tcfg)
    # NB: the project's block_spec() lists num_layers specs; TransformerBlock builds every spec it is
    # given (a TransformerBlockSubmodules is taken as is), so per stage it must list n_local.
    spec = TransformerBlockSubmodules(layer_specs=[layer_spec(mcfg)] * n_local, layer_norm=LayerNorm)
    model = GPTModelWithEmbedding(
        config=tcfg, transformer_layer_spec=spec, vocab_size=mcfg.padded_vocab_size,
        max_sequence_length=mcfg.max_positions, pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(), share_embeddings_and_output_weights=mcfg.tie_embeddings,
        position_embedding_type="learned_absolute", embedding=mcfg.embedding)
    return model


def stage_key_map(model) -> dict[str, str]:
    """local state_dict key -> key of the full (PP=1) model."""
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    offset = get_transformer_layer_offset(model.config)
    out = {}
    for k, v in model.state_dict().items():
        if not isinstance(v, torch.Tensor):
            continue
        m = re.match(r"decoder\.layers\.(\d+)\.(.*)", k)
        if m:
            out[k] = f"decoder.layers.{int(m.group(1)) + offset}.{m.group(2)}"
        elif k == "output_layer.weight" and model.share_embeddings_and_output_weights:
            out[k] = "embedding.word_embeddings.weight"  # the last stage's copy of the tied matrix
        else:
            out[k] = k
    return out


def load_slice(model, full_sd):
    kmap = stage_key_map(model)
    sd = {k: full_sd[g] for k, g in kmap.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    assert not missing and not unexpected, (missing, unexpected)
    return kmap


# ------------------------------------------------------------------------------------------ data

def make_batches():
    g = torch.Generator().manual_seed(SEED + 1)
    steps = []
    for _ in range(STEPS):
        mbs = []
        for _ in range(NMB):
            full = torch.randint(0, VOCAB, (MBS, SEQ + 1), generator=g)
            mask = torch.ones(MBS, SEQ)
            mask[0, -5:] = 0  # some masked tokens, so the masked mean matters
            mbs.append({"tokens": full[:, :-1].contiguous(), "labels": full[:, 1:].contiguous(), "loss_mask": mask})
        steps.append(mbs)
    return steps


def positions(tokens):
    return torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)


# ------------------------------------------------------------------------------------------ DeepSpeed

class PipeMPU:
    """DeepSpeed's mpu for TP x PP x DP.

    - get_data_parallel_*: ZeRO shards / reduces over DP only.
    - get_model_parallel_group: megatron's model-parallel group (TP x PP), so ZeRO's global grad norm
      (and clipping) sums over every pipeline stage.
    - get_tensor_model_parallel_rank: ZeRO-1/2's norm counts a non-TP parameter where this is 0
      (bwc_tensor_model_parallel_rank prefers it over get_model_parallel_rank), i.e. once per stage.
    - get_model_parallel_rank: the TP x PP rank, unique per stage (DeepSpeed names the model-state
      checkpoint file mp_rank_XX after it, so stages must differ).
    """

    def __init__(self):
        from megatron.core import parallel_state as ps

        self.ps = ps

    def get_model_parallel_world_size(self):
        return dist.get_world_size(self.get_model_parallel_group())

    def get_model_parallel_rank(self):
        return dist.get_rank(self.get_model_parallel_group())

    def get_model_parallel_group(self):
        if MPU_KIND == "project":  # mlra_mega.distributed.DeepSpeedMPU today: the TP group
            return self.ps.get_tensor_model_parallel_group()
        return self.ps.get_model_parallel_group()

    def get_tensor_model_parallel_rank(self):
        return self.ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self):
        return self.ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    def get_data_parallel_world_size(self):
        return self.ps.get_data_parallel_world_size()

    def get_data_parallel_rank(self):
        return self.ps.get_data_parallel_rank()

    def get_data_parallel_group(self):
        return self.ps.get_data_parallel_group()


def param_groups(model):
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]


def make_engine(model, *, micro, gas, unmanaged):
    import deepspeed

    dp = PipeMPU().get_data_parallel_world_size()
    cfg = {
        "train_batch_size": micro * gas * dp,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": CLIP,
        "zero_optimization": {"stage": ZERO},
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if unmanaged and DS_MODE == "unmanaged":
        # backward() is not ours: step() is the accumulation boundary and reduces over DP itself.
        cfg["managed_gradient_accumulation"] = False
    opt = torch.optim.AdamW(param_groups(model), lr=LR, betas=(0.9, 0.95), eps=1e-8)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg, mpu=PipeMPU(),
                                           dist_init_required=False)
    return engine


# ------------------------------------------------------------------------------------------ train paths

def loss_func(loss_mask, per_token):
    """Masked mean of one micro-batch (on the last stage). Megatron divides the returned loss by
    num_microbatches before backward (the 2-tuple form), as DeepSpeed's GAS scaling would."""
    loss = (per_token.float() * loss_mask).sum() / loss_mask.sum()
    # clone: the schedule divides the returned loss in place (output_tensor /= num_microbatches),
    # and a bare .detach() shares its storage, so the reported value would be loss / NMB.
    return loss, {"lm loss": loss.detach().clone()}


def forward_step(data_iterator, model):
    b = next(data_iterator)
    out = model(b["tokens"], positions(b["tokens"]), None, labels=b["labels"])
    # out: per-token loss [b, s] on the last stage, hidden states [s, b, h] elsewhere
    return out, partial(loss_func, b["loss_mask"])


def allreduce_tied_embedding_grad(model):
    """What megatron's finalize_model_grads -> _allreduce_word_embedding_grads does (that one needs
    megatron's DDP wrapper: finish_grad_sync(), ddp_config, main_grad)."""
    from megatron.core import parallel_state as ps

    if not model.share_embeddings_and_output_weights or ps.get_pipeline_model_parallel_world_size() == 1:
        return
    if ps.is_rank_in_embedding_group():
        w = model.shared_embedding_or_output_weight()
        if w.grad is not None:
            dist.all_reduce(w.grad, group=ps.get_embedding_group())


def train_with_schedule(model, engine, batches, tag):
    """megatron's get_forward_backward_func (1F1B at PP>1, no-pipelining at PP=1) + DeepSpeed step."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    fb = get_forward_backward_func()
    last = ps.is_pipeline_last_stage()
    last_rank = ps.get_pipeline_model_parallel_last_rank()
    out = []
    for step, mbs in enumerate(batches):
        t0 = time.time()
        model.train()
        data = fb(forward_step_func=forward_step, data_iterator=iter(mbs), model=[model],
                  num_microbatches=NMB, seq_length=SEQ, micro_batch_size=MBS, forward_only=False)
        allreduce_tied_embedding_grad(model)
        lr = engine.get_lr()[0]
        if DS_MODE == "managed_allreduce":
            engine.allreduce_gradients()  # what engine.backward's epilogue would have done
        engine.step()  # unmanaged: reduce over DP (ZeRO-1 reduce_gradients), norm over TP x PP, clip, AdamW
        loss = torch.zeros((), dtype=torch.float64)
        if last:
            loss += torch.stack([d["lm loss"] for d in data]).double().mean()
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(loss, src=last_rank, group=ps.get_pipeline_model_parallel_group())
        norm = engine.get_global_grad_norm()
        norm = float("nan") if norm is None else norm
        rec = {"step": step + 1, "loss": float(loss), "grad_norm": float(norm), "lr": lr,
               "applied": engine.was_step_applied(), "s": round(time.time() - t0, 2)}
        log(tag, rec)
        out.append(rec)
    return out


def train_like_trainstep(engine, batches, tag):
    """The project's TrainStep: engine forward, masked mean, engine.backward, engine.step per micro."""
    out = []
    for step, mbs in enumerate(batches):
        t0 = time.time()
        lr = engine.get_lr()[0]
        losses = []
        for b in mbs:
            per_token = engine(b["tokens"], positions(b["tokens"]), None, labels=b["labels"])
            loss = (per_token.float() * b["loss_mask"]).sum() / b["loss_mask"].sum()
            engine.backward(loss)
            engine.step()
            losses.append(loss.detach())
        rec = {"step": step + 1, "loss": float(torch.stack(losses).double().mean()),
               "grad_norm": float(engine.get_global_grad_norm() or "nan"), "lr": lr,
               "applied": engine.was_step_applied(), "s": round(time.time() - t0, 2)}
        log(tag, rec)
        out.append(rec)
    return out


def full_state(model, kmap):
    return {kmap[k]: v.detach().clone() for k, v in model.state_dict().items() if k in kmap}


# ------------------------------------------------------------------------------------------ compare

def compare():
    p1, p2 = OUT / "result_pp1.json", OUT / "result_pp2.json"
    if not (p1.exists() and p2.exists()):
        print("compare: need both", p1, p2)
        return
    r1, r2 = json.loads(p1.read_text()), json.loads(p2.read_text())
    print("\n=== loss / grad-norm agreement ===")
    print(f"{'step':>4} {'ref_engine loss':>18} {'ref_sched loss':>18} {'pp2 loss':>18} {'|pp2-engine|':>12} "
          f"{'|pp2-sched|':>12} {'norm eng':>10} {'norm pp2':>10} {'|dnorm|':>9}")
    for a, b, c in zip(r1["ref_engine"], r1["ref_sched"], r2["pp2"]):
        print(f"{a['step']:>4} {a['loss']:>18.12f} {b['loss']:>18.12f} {c['loss']:>18.12f} "
              f"{abs(c['loss'] - a['loss']):>12.3e} {abs(c['loss'] - b['loss']):>12.3e} "
              f"{a['grad_norm']:>10.6f} {c['grad_norm']:>10.6f} {abs(c['grad_norm'] - a['grad_norm']):>9.2e}")
    final1 = torch.load(OUT / "final_pp1_engine.pt")
    final1s = torch.load(OUT / "final_pp1_sched.pt")
    final2 = {}
    for r in range(2):
        final2.update(torch.load(OUT / f"final_pp2_rank{r}.pt"))
    d_eng = max(float((final2[k] - final1[k]).abs().max()) for k in final1)
    d_sch = max(float((final2[k] - final1s[k]).abs().max()) for k in final1s)
    d_refs = max(float((final1s[k] - final1[k]).abs().max()) for k in final1)
    print(f"final weights after {len(r2['pp2'])} steps, max |diff|: pp2 vs ref_engine {d_eng:.3e}; "
          f"pp2 vs ref_sched {d_sch:.3e}; ref_sched vs ref_engine {d_refs:.3e}; keys {len(final1)} / {len(final2)}")


# ------------------------------------------------------------------------------------------ main

def main():
    if "--compare" in sys.argv:
        compare()
        return
    t_start = time.time()
    rank, world = init_dist()
    assert world in (1, 2)
    extra = apply_shims()
    if rank == 0:
        log("extra shims:\n  " + "\n  ".join(extra))
    from megatron.core import parallel_state as ps

    mcfg = model_cfg()
    full_sd = build_full_init_state(mcfg)
    init_path = OUT / "init.pt"
    if world == 1 and DEFAULT:
        torch.save(full_sd, init_path)
    elif init_path.exists():
        saved = torch.load(init_path)
        same = saved.keys() == full_sd.keys() and all(torch.equal(saved[k], full_sd[k]) for k in saved)
        log("full build identical to init.pt from the PP=1 run:", same)
        full_sd = saved
    batches = make_batches()

    if world == 2 and MODE == "dp2":
        ps.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
        seed_all(SEED)
        model = build_stage(mcfg, pp=1)
        kmap = load_slice(model, full_sd)
        global NMB
        NMB = NMB // 2  # this rank's half of every global batch
        mine = [mbs[rank * NMB:(rank + 1) * NMB] for mbs in batches]
        engine = make_engine(model, micro=MBS * NMB, gas=1, unmanaged=True)
        res = train_with_schedule(model, engine, mine, "dp2")
        # the loss is this rank's mean: the DP mean is the global one
        for r in res:
            t = torch.tensor(r["loss"], dtype=torch.float64)
            dist.all_reduce(t)
            r["loss"] = float(t) / 2
        log("dp2 DP-mean losses:", [r["loss"] for r in res])
        if rank == 0:
            (OUT / "result_dp2.json").write_text(json.dumps({"dp2": res}, indent=1))
            torch.save(full_state(model, kmap), OUT / "final_dp2.pt")
            final1 = torch.load(OUT / "final_pp1_engine.pt")
            ref = json.loads((OUT / "result_pp1.json").read_text())["ref_engine"]
            for a, b in zip(ref, res):
                log(f"step {a['step']}: |dp2-ref_engine| loss {abs(a['loss'] - b['loss']):.3e} "
                    f"norm {abs(a['grad_norm'] - b['grad_norm']):.3e}")
            fin = full_state(model, kmap)
            log("dp2 final weights max |diff| vs ref_engine:",
                f"{max(float((fin[k] - final1[k]).abs().max()) for k in final1):.3e}")
        engine.destroy()
        dist.barrier()
        dist.destroy_process_group()
        return
    if world == 1:
        results = {}
        for tag in ("ref_engine", "ref_sched"):
            ps.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
            seed_all(SEED)
            model = build_stage(mcfg, pp=1)
            kmap = load_slice(model, full_sd)
            if tag == "ref_engine":
                engine = make_engine(model, micro=MBS, gas=NMB, unmanaged=False)
                results[tag] = train_like_trainstep(engine, batches, tag)
            else:
                engine = make_engine(model, micro=MBS * NMB, gas=1, unmanaged=True)
                results[tag] = train_with_schedule(model, engine, batches, tag)
            if DEFAULT:
                torch.save(full_state(model, kmap), OUT / f"final_pp1_{tag.split('_')[1]}.pt")
            engine.destroy()
            ps.destroy_model_parallel()
        if DEFAULT:
            (OUT / "result_pp1.json").write_text(json.dumps(results, indent=1))
    else:
        ps.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=2)
        seed_all(SEED)
        model = build_stage(mcfg, pp=2)
        first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
        log(f"stage {ps.get_pipeline_model_parallel_rank()}: pre_process={model.pre_process} "
            f"post_process={model.post_process} local layers={len(model.decoder.layers)} "
            f"layer_number={[l.layer_number for l in model.decoder.layers]} "
            f"params={[n for n, _ in model.named_parameters() if not n.startswith('decoder.layers')]}")
        if TIE:  # the tied copy is equal on both stages after construction (shim 7's all-reduce)
            w = model.shared_embedding_or_output_weight().detach().clone()
            other = w.clone()
            dist.broadcast(other, src=0)
            log("tied weight equal on both stages after construction:", torch.equal(w, other))
        kmap = load_slice(model, full_sd)
        if TIE and last and MARK_REPLICATED:
            # counted once in the global norm (ZeRO-1 skips params with ds_pipe_replicated=True)
            model.shared_embedding_or_output_weight().ds_pipe_replicated = True
        engine = make_engine(model, micro=MBS * NMB, gas=1, unmanaged=True)
        res = train_with_schedule(model, engine, batches, "pp2")
        variant = f"sync={SYNC_MODE} skip={SKIP_SHIM} ds={DS_MODE} mark={MARK_REPLICATED} mpu={MPU_KIND} zero={ZERO}"
        log(variant, "losses", [r["loss"] for r in res], "norms", [r["grad_norm"] for r in res])
        if DEFAULT:
            torch.save(full_state(model, kmap), OUT / f"final_pp2_rank{rank}.pt")
        if TIE:
            w = model.shared_embedding_or_output_weight().detach().clone()
            other = w.clone()
            dist.broadcast(other, src=0)
            log("tied weight equal on both stages after training:", torch.equal(w, other))
        if rank == 0 and DEFAULT:
            (OUT / "result_pp2.json").write_text(json.dumps({"pp2": res}, indent=1))
        engine.destroy()
        dist.barrier()
    log(f"done in {time.time() - t_start:.1f}s")
    if rank == 0 and DEFAULT and (OUT / "result_pp1.json").exists() and (OUT / "result_pp2.json").exists():
        compare()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
