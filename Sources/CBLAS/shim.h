// The C interface AttentionKit uses: CBLAS from OpenBLAS (sgemm for QKᵀ and AV).
// Debian ships openblas.pc, which points at OpenBLAS's cblas.h.
#include <cblas.h>

// OpenBLAS extensions (declared in its cblas.h, repeated here so the shim states what we rely on).
void openblas_set_num_threads(int num_threads);
int openblas_get_num_threads(void);
char *openblas_get_corename(void);
