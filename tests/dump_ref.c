// dump_ref: writes the exchange file that tests/reference.py checks against PyTorch.
//
//   tests/dump_ref PRESET BATCH FILE
//
// It builds the U-Net of a preset with random weights (not the official init, whose
// 1e-10 scales would silence whole branches and hide their gradients), runs one
// forward and backward pass of L_simple (Eq. 14) on a random x_t, t, eps with
// dropout off, and writes config, weights, inputs, eps_theta, the loss and every
// parameter gradient. Format (little-endian): "DDPMREF1", int32 n_records, then per
// record: int32 name_len, name, int32 ndim, int32 shape[ndim], float32 data.
#define DDPM_NO_MAIN
#include "../ddpm.c"

static int n_records;

static void record(FILE* f, const char* name, int ndim, const int* shape, const float* data) {
    int32_t len = (int32_t)strlen(name), nd = ndim;
    size_t n = 1;
    fwrite(&len, 4, 1, f);
    fwrite(name, 1, len, f);
    fwrite(&nd, 4, 1, f);
    for (int i = 0; i < ndim; i++) { int32_t s = shape[i]; fwrite(&s, 4, 1, f); n *= shape[i]; }
    if (fwrite(data, sizeof(float), n, f) != n) die("write failed");
    n_records++;
}

static void record_ints(FILE* f, const char* name, const int* v, int n) {
    float buf[MAX_LEVELS];
    for (int i = 0; i < n; i++) buf[i] = (float)v[i];
    record(f, name, 1, &n, buf);
}

int main(int argc, char** argv) {
    if (argc != 4) { fprintf(stderr, "usage: %s PRESET BATCH FILE\n", argv[0]); return 2; }
    Config cfg;
    if (!preset_find(argv[1], &cfg)) die("unknown preset %s", argv[1]);
    int B = atoi(argv[2]);
    UNet m;
    unet_build(&m, &cfg, B);
    Rng rng;
    rng_seed(&rng, 1234);
    for (int i = 0; i < m.L->n_tensors; i++) {
        ParamTensor* t = &m.L->tensors[i];
        float* p = m.params + t->offset;
        float z[2];
        size_t fan_in = t->numel / t->shape[0];
        for (size_t j = 0; j < t->numel; j++) {
            rng_normal(&rng, z, 1);
            if (t->init == INIT_UNIFORM) p[j] = z[0] / sqrtf((float)fan_in);
            else if (t->init == INIT_ONE) p[j] = 1.0f + 0.2f * z[0];
            else p[j] = 0.1f * z[0];
        }
    }
    size_t n = (size_t)B * cfg.in_ch * cfg.img * cfg.img;
    float* x_t = malloc_check(n * sizeof(float), "x_t");
    float* eps = malloc_check(n * sizeof(float), "eps");
    float* d_eps = malloc_check(n * sizeof(float), "d eps_theta");
    int* t_idx = malloc_check(B * sizeof(int), "t");
    float* t_f = malloc_check(B * sizeof(float), "t");
    rng_normal(&rng, x_t, n);
    rng_normal(&rng, eps, n);
    for (int b = 0; b < B; b++) { t_idx[b] = rng_int(&rng, 1000); t_f[b] = (float)t_idx[b]; }
    m.train = 0;
    unet_zero_grad(&m);
    float* eps_theta = unet_forward(&m, x_t, t_idx, B);
    float loss = l_simple(d_eps, eps_theta, eps, n);
    unet_backward(&m, d_eps, B);

    FILE* f = fopen_check(argv[3], "wb", NULL);
    fwrite("DDPMREF1", 1, 8, f);
    int32_t placeholder = 0;
    fwrite(&placeholder, 4, 1, f);
    record_ints(f, "config.in_ch", &cfg.in_ch, 1);
    record_ints(f, "config.ch", &cfg.ch, 1);
    record_ints(f, "config.num_res_blocks", &cfg.num_res_blocks, 1);
    record_ints(f, "config.groups", &cfg.groups, 1);
    record_ints(f, "config.img", &cfg.img, 1);
    record_ints(f, "config.ch_mult", cfg.ch_mult, cfg.n_levels);
    record_ints(f, "config.attn_resolutions", cfg.attn_res, cfg.n_attn);
    int shape[4] = {B, cfg.in_ch, cfg.img, cfg.img}, one = 1;
    record(f, "input.x_t", 4, shape, x_t);
    record(f, "input.t", 1, &B, t_f);
    record(f, "input.eps", 4, shape, eps);
    record(f, "output.eps_theta", 4, shape, eps_theta);
    record(f, "output.loss", 1, &one, &loss);
    char name[80];
    for (int i = 0; i < m.L->n_tensors; i++) {
        ParamTensor* t = &m.L->tensors[i];
        snprintf(name, sizeof name, "param.%s", t->name);
        record(f, name, t->ndim, t->shape, m.params + t->offset);
        snprintf(name, sizeof name, "grad.%s", t->name);
        record(f, name, t->ndim, t->shape, m.grads + t->offset);
    }
    fseek(f, 8, SEEK_SET);
    int32_t nr = n_records;
    fwrite(&nr, 4, 1, f);
    if (fclose(f) != 0) die("cannot write %s", argv[3]);
    printf("dump_ref: %s batch %d, %zu parameters, loss %.6f -> %s\n", argv[1], B, m.n_params, loss, argv[3]);
    unet_free(&m);
    return 0;
}
