// ./ddpm with the direct 3x3 convolution everywhere, Winograd's (ddpm.c 17.2.1) off: the
// same program otherwise, to compare the two on a trained checkpoint (notebooks/README.md).
//   make build/ddpm_direct && tests/learning_curve.py eval CKPT --ddpm build/ddpm_direct ...
#include "../ddpm.c"
__attribute__((constructor)) static void direct_conv(void) { wino_force = -1; }
