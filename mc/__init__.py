"""MegaContext: an unbounded history at a fixed working-context cost (docs/architecture.md).

The pipeline, in order:
    config           MCConfig: every --mc_* flag, checked against the GPT
    tree, gistnet    history -> LOD0 embeddings -> LOD1 gists (K tokens) -> LOD2 gists (K^2 tokens) -> ... as deep as needed
    working_context  LOD maps -> the W entries the GPT reads (raw tokens and gists), materialised as tensors
    lensnet          scores every entry of a working context: expand (more detail) or collapse
    allocator        turns scores into legal maps within W (greedy edits in training, selection at inference)
    positional       rotary positions of entries (a gist sits at its block's centre), frames past T
    runtime          MCController: the training step (variants, losses) and the focus shared by all users
    session, chat    inference: a growing tree, refocus, KV reuse, save/load; the chat wrapper

Around it: build (nets and checkpoints), arms (evaluation arms for scripts/mc_eval.py), telemetry
(phase timings and trace spans), focus_map (plots of a focus).
"""
