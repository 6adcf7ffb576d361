// The two C interfaces AttentionKit uses: CBLAS (sgemm for QKᵀ and AV) and LAPACKE (dgels for fits).
// Debian ships openblas.pc, which points at OpenBLAS's cblas.h; lapacke.h comes from liblapacke-dev.
#include <cblas.h>
#include <lapacke.h>

// OpenBLAS extensions (declared in its cblas.h, repeated here so the shim states what we rely on).
void openblas_set_num_threads(int num_threads);
int openblas_get_num_threads(void);
char *openblas_get_corename(void);
