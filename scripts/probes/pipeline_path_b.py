"""Path B smoke: DeepSpeed PipelineModule / PipelineEngine with layers made of megatron-core modules.

  OMP_NUM_THREADS=1 python3 -m torch.distributed.run --standalone --nproc-per-node=2 scripts/probes/pipeline_path_b.py

Same tiny model, seed, initial weights (/tmp/pp/init.pt from probe_a's PP=1 run), data, AdamW, clip
as probe_a; compares its losses with /tmp/pp/result_pp1.json (ref_engine). megatron's parallel_state
is initialised at TP=1, PP=1 (megatron only builds layers); DeepSpeed's grid owns the pipeline.
"""

from __future__ import annotations

import json
import sys
import time

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import pipeline_path_a as A  # noqa: E402  (its shims, config, data, helpers)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def main():
    t0 = time.time()
    rank, world = A.init_dist()
    assert world == 2
    A.apply_shims()
    import deepspeed
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
    from megatron.core import parallel_state as ps
    from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
    from megatron.core.transformer.spec_utils import build_module
    from mlra_mega.model.build import transformer_config
    from mlra_mega.model.norm import LayerNorm
    from mlra_mega.model.specs import layer_spec

    # PipelineModule builds its grid with deepspeed.comm, which must be up before (deepspeed.initialize
    # would do it later, too late for the module); it adopts the torch process group already there.
    deepspeed.init_distributed(dist_backend="gloo")
    mcfg = A.model_cfg()
    full_sd = torch.load(A.OUT / "init.pt")
    ps.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    A.seed_all(A.SEED)
    tcfg = transformer_config(mcfg)

    class EmbedPipe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = LanguageModelEmbedding(config=tcfg, vocab_size=mcfg.padded_vocab_size,
                                              max_sequence_length=mcfg.max_positions,
                                              position_embedding_type="learned_absolute")

        def forward(self, tokens):
            return self.emb(input_ids=tokens, position_ids=A.positions(tokens))  # [s, b, h]

    def head_forward(module, hidden):  # the tied copy used as the output layer
        return F.linear(hidden, module.emb.word_embeddings.weight)  # [s, b, V]

    class LayerPipe(torch.nn.Module):
        def __init__(self, number):
            super().__init__()
            self.layer = build_module(layer_spec(mcfg), config=tcfg, layer_number=number)

        def forward(self, hidden):
            out, _context = self.layer(hidden, attention_mask=None)
            return out

    class FinalNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = LayerNorm(tcfg, tcfg.hidden_size, eps=tcfg.layernorm_epsilon)

        def forward(self, hidden):
            return self.norm(hidden)

    def loss_fn(logits, labels_and_mask):
        labels, mask = labels_and_mask
        per_token = F.cross_entropy(logits.float().transpose(0, 1).reshape(-1, logits.shape[-1]),
                                    labels.reshape(-1), reduction="none").view_as(labels)
        return (per_token * mask).sum() / mask.sum()

    specs = [TiedLayerSpec("embed", EmbedPipe, tied_weight_attr=["emb.word_embeddings.weight"])]
    specs += [LayerSpec(LayerPipe, i + 1) for i in range(A.LAYERS)]
    specs += [LayerSpec(FinalNorm),
              TiedLayerSpec("embed", EmbedPipe, forward_fn=head_forward,
                            tied_weight_attr=["emb.word_embeddings.weight"])]
    net = PipelineModule(layers=specs, num_stages=2, loss_fn=loss_fn, partition_method="type:LayerPipe")

    # initial weights: PipelineModule names layers by their global index in `specs`
    local = {}
    for k, v in net.state_dict().items():
        if not isinstance(v, torch.Tensor) or k.endswith("_extra_state"):
            continue
        if k.startswith("tied_modules.embed.emb."):
            local[k] = full_sd["embedding." + k[len("tied_modules.embed.emb."):]]
        else:
            idx, rest = k.split(".", 1)
            idx = int(idx)
            if 1 <= idx <= A.LAYERS:
                local[k] = full_sd[f"decoder.layers.{idx - 1}.{rest[len('layer.'):]}"]
            elif idx == A.LAYERS + 1:
                local[k] = full_sd[f"decoder.final_layernorm.{rest[len('norm.'):]}"]
    missing, unexpected = net.load_state_dict(local, strict=False)
    missing = [m for m in missing if not m.endswith("_extra_state")]
    assert not missing and not unexpected, (missing, unexpected)
    A.log("stage keys:", sorted({k.split(".")[0] for k in local}),
          "replicated:", [n for n, p in net.named_parameters() if getattr(p, "ds_pipe_replicated", False)])

    cfg = {"train_batch_size": A.MBS * A.NMB, "train_micro_batch_size_per_gpu": A.MBS,
           "gradient_accumulation_steps": A.NMB, "gradient_clipping": A.CLIP,
           "zero_optimization": {"stage": 1}, "bf16": {"enabled": False}, "fp16": {"enabled": False},
           "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    opt = torch.optim.AdamW(A.param_groups(net), lr=A.LR, betas=(0.9, 0.95), eps=1e-8)
    engine, _, _, _ = deepspeed.initialize(model=net, optimizer=opt, config=cfg, dist_init_required=False)

    res = []
    for step, mbs in enumerate(A.make_batches()):
        it = iter([(b["tokens"], (b["labels"], b["loss_mask"])) for b in mbs])
        loss = engine.train_batch(data_iter=it)
        res.append({"step": step + 1, "loss": float(loss), "grad_norm": float(engine.get_global_grad_norm())})
        A.log("pipe", res[-1])
    if rank == 0:
        ref = json.loads((A.OUT / "result_pp1.json").read_text())["ref_engine"]
        for a, b in zip(ref, res):
            A.log(f"step {a['step']}: |B-ref_engine| loss {abs(a['loss'] - b['loss']):.3e} "
                  f"norm {abs(a['grad_norm'] - b['grad_norm']):.3e}")
    A.log(f"done in {time.time() - t0:.1f}s")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
