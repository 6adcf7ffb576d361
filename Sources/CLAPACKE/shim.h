// LAPACKE's dgels (least squares), for attn's power-law fits only: AttentionKit does not link it.
// lapacke.h comes from liblapacke-dev.
#include <lapacke.h>
