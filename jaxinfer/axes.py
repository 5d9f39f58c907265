"""The logical axis vocabulary of jaxinfer, defined once.

Every weight, cache and activation names each of its dimensions with one of the logical axis
names below. Partitioning (``partitioning/``) maps these names onto mesh axes with one rules object;
nothing else in the model knows about meshes.

Einsum letters (scaling-book convention) used in shape comments throughout the code:

======  =============  ===========================================================
letter  logical name   meaning
======  =============  ===========================================================
V       ``vocab``      vocabulary
D       ``embed``      model width, d_model (Pope et al.: E)
F       ``mlp``        feed-forward width, d_ff
N       ``q_heads``    query heads
K       ``kv_heads``   key/value heads (1 = multiquery, < N = grouped-query)
G       --             query heads per KV head, N // K (never stored, never sharded)
H       ``head_dim``   per-head width (Pope et al.: Q)
B       ``batch``      sequences in the batch
T       ``seq``        query positions of this call (prompt chunk, or 1 when decoding)
S       ``cache_seq``  key positions held by the KV cache
======  =============  ===========================================================

Weights use the parameter names (``embed``, ``mlp``, ``q_heads``, ...). Activations use the ``act_``
names so a layout can shard a weight's model axis differently from the activations flowing past it
(e.g. Pope et al.'s 2D weight-stationary layout stores weights ``E_x F_yz`` while the residual stream
is ``B L E_xyz``).
"""

VOCAB = "vocab"
EMBED = "embed"
MLP = "mlp"
Q_HEADS = "q_heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"

BATCH = "batch"
SEQ = "seq"
CACHE_SEQ = "cache_seq"
ACT_EMBED = "act_embed"
ACT_MLP = "act_mlp"
ACT_Q_HEADS = "act_q_heads"
ACT_KV_HEADS = "act_kv_heads"
ACT_VOCAB = "act_vocab"

PARAM_AXES = (VOCAB, EMBED, MLP, Q_HEADS, KV_HEADS, HEAD_DIM)
ACTIVATION_AXES = (BATCH, SEQ, CACHE_SEQ, ACT_EMBED, ACT_MLP, ACT_Q_HEADS, ACT_KV_HEADS, ACT_VOCAB)
ALL_AXES = PARAM_AXES + ACTIVATION_AXES

# Logical shapes of the tensors that flow between model functions (used for sharding constraints).
RESIDUAL = (BATCH, SEQ, ACT_EMBED)  # [B, T, D]
FFN_HIDDEN = (BATCH, SEQ, ACT_MLP)  # [B, T, F]
QUERIES = (BATCH, SEQ, ACT_Q_HEADS, HEAD_DIM)  # [B, T, N, H]
KEYS = (BATCH, SEQ, ACT_KV_HEADS, HEAD_DIM)  # [B, T, K, H]
LOGITS = (BATCH, SEQ, ACT_VOCAB)  # [B, T, V]
KV_CACHE = (BATCH, ACT_KV_HEADS, CACHE_SEQ, HEAD_DIM)  # one layer's cache [B, K, S, H]
