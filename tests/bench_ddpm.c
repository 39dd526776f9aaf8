// bench_ddpm: times a training step (Alg. 1) and a sampling step (Alg. 2) of ddpm.c, and
// prints one JSON line with the keys of tests/bench_torch.py. `make bench` builds it and
// tests/bench_table.py runs it beside PyTorch.
//
//   tests/bench_ddpm [--model tiny|small|paper] [--batch B] [--steps S] [--warmup-steps W] [--threads T]
//                    [--direct 1]          the direct conv everywhere, Winograd's (17.2.1) off
//   tests/bench_ddpm --winograd-table [--threads T]    the 3x3 conv's tiles, shape by shape
//   tests/bench_ddpm --blocks [--model M --batch B --steps S --threads T]
//                    a sampling forward pass block by block: where its time goes
//
// It includes ddpm.c (as test_ddpm.c and dump_ref.c do), so it measures the very code
// ./ddpm runs; ddpm.c itself holds no benchmark. The images are uniform noise in a
// made-up dataset: the speed of a step does not depend on what the pixels are.
// Beside the step times it reports what the binary was built for (section 17.0), the
// machine's FMA peak at that vector width, ddpm.c's own matmul (section 17.1) on a large
// problem as a check of that peak, and the model's 3x3 convolutions one resolution at a time.
#define DDPM_NO_MAIN
#include "../ddpm.c"

// The FMA peak, measured: every thread runs PEAK_CHAINS independent chains
// acc = acc * m + c on VW-float vectors. The chains must stay in registers (the loop is
// unrolled, so each acc[k] is a register of its own: kept in memory, each FMA would wait
// on a store and a load, which measured half the peak on an Intel Xeon), and be enough
// to cover every FMA pipe's latency (2 pipes x 4 cycles = 8 in flight; 12 here, with room
// on 16 registers). The best of 5 rounds of ~0.1 s. (The reference build has no vectors: 0.)
#ifndef DDPM_PLAIN
#define PEAK_CHAINS 12
static double fma_chains_seconds(long iters) {
    double t0 = now_seconds(), sink = 0;
    #pragma omp parallel num_threads(kernel_threads) reduction(+ : sink)
    {
        float m = 0.999999f, c = 1e-7f * (float)(thread_id() + 1);
#if DDPM_SIMD
        vecf acc[PEAK_CHAINS];
        #pragma GCC unroll 16
        for (int k = 0; k < PEAK_CHAINS; k++) acc[k] = (vecf){0} + (float)k;
        for (long i = 0; i < iters; i++) {
            #pragma GCC unroll 16
            for (int k = 0; k < PEAK_CHAINS; k++) acc[k] = acc[k] * m + c;
        }
        for (int k = 0; k < PEAK_CHAINS; k++)
            for (int l = 0; l < VW; l++) sink += acc[k][l];
#else
        float acc[PEAK_CHAINS][VW];
        for (int k = 0; k < PEAK_CHAINS; k++)
            for (int l = 0; l < VW; l++) acc[k][l] = (float)k;
        for (long i = 0; i < iters; i++)
            for (int k = 0; k < PEAK_CHAINS; k++)
                for (int l = 0; l < VW; l++) acc[k][l] = acc[k][l] * m + c;
        for (int k = 0; k < PEAK_CHAINS; k++)
            for (int l = 0; l < VW; l++) sink += acc[k][l];
#endif
    }
    if (sink == 12345.678) puts("");   // uses the chains' results, so they are computed
    return now_seconds() - t0;
}

static double fma_peak_gflops(void) {
    long iters = 1 << 14;
    while (fma_chains_seconds(iters) < 0.1) iters *= 2;
    double best = 0;
    for (int round = 0; round < 5; round++) {
        double gf = 2.0 * PEAK_CHAINS * VW * iters * kernel_threads / fma_chains_seconds(iters) / 1e9;
        if (gf > best) best = gf;
    }
    return best;
}

// ddpm.c's matmul (section 17.1) on a 1024^3 problem, the best of 3: no program of this
// width can beat the FMA peak, so this checks the peak from below.
static double matmul_gflops(void) {
    int N = 1024;
    float* a = malloc_check((size_t)N * N * sizeof(float), "bench buffers");
    float* b = malloc_check((size_t)N * N * sizeof(float), "bench buffers");
    float* c = malloc_check((size_t)N * N * sizeof(float), "bench buffers");
    for (size_t i = 0; i < (size_t)N * N; i++) a[i] = b[i] = 1e-3f * (float)(i % 997);
    double best = 0;
    for (int r = 0; r < 4; r++) {
        double t0 = now_seconds();
        matmul(c, a, b, N, N, N, N, N, N, 0, 0, 0);
        double gf = 2.0 * N * N * N / (now_seconds() - t0) / 1e9;
        if (r > 0 && gf > best) best = gf;   // the first call packs and warms up
    }
    free(a); free(b); free(c);
    return best;
}
#else
static double fma_peak_gflops(void) { return 0; }
static double matmul_gflops(void) { return 0; }
static int wino_force;   // the reference layers have no Winograd
static int wino_tile(int B, int C_in, int C_out, int H, int W) { return 0 * B * C_in * C_out * H * W; }
#endif

// One 3x3 convolution of the model's shapes, forward and backward (input and weight
// gradients), timed over `reps` calls after one untimed: GFLOP/s as "fwd/bwd", counting
// the direct conv's multiply-adds whichever way it runs (so Winograd's are "effective").
static void bench_conv3x3(int B, int C, int H, int reps, double* fwd, double* bwd) {
    size_t nx = (size_t)B * C * H * H, nw = (size_t)C * C * 9;
    float* x = malloc_check(nx * sizeof(float), "bench buffers");
    float* y = malloc_check(nx * sizeof(float), "bench buffers");
    float* dx = malloc_check(nx * sizeof(float), "bench buffers");
    float* w = malloc_check(nw * sizeof(float), "bench buffers");
    float* dw = malloc_check(nw * sizeof(float), "bench buffers");
    float* bias = calloc_check(C, sizeof(float), "bench buffers");
    float* db = calloc_check(C, sizeof(float), "bench buffers");
    float* ws = malloc_check(conv2d_workspace_floats(B, C, H, H, C, 3, 1, kernel_threads) * sizeof(float), "bench buffers");
    Rng r;
    rng_seed(&r, 1);
    rng_normal(&r, x, nx);
    rng_normal(&r, w, nw);
    memset(dx, 0, nx * sizeof(float));
    double flop = 2.0 * B * C * C * 9 * H * H;
    for (int pass = 0; pass < 2; pass++) {
        double t0 = 0;
        for (int i = 0; i <= reps; i++) {
            if (i == 1) t0 = now_seconds();
            if (pass == 0) conv2d_forward(y, x, w, bias, B, C, H, H, C, 3, 1, ws);
            else conv2d_backward(dx, dw, db, y, x, w, B, C, H, H, C, 3, 1, ws);
        }
        double dt = (now_seconds() - t0) / reps;
        if (pass == 0) *fwd = flop / dt / 1e9; else *bwd = 2 * flop / dt / 1e9;
    }
    free(x); free(y); free(dx); free(w); free(dw); free(bias); free(db); free(ws);
}

// FLOPs of one forward pass for one image: 2 x the multiply-adds of every convolution,
// linear layer and the two matmuls of each attention. A training step counts 3x this
// (forward, and two matmuls per layer backward), the same rule as tests/bench_torch.py.
static double unet_forward_flops(const UNet* m) {
    const Config* c = &m->cfg;
    double S2 = (double)c->img * c->img, E = 4.0 * c->ch;
    double f = 2 * (c->ch * E + E * E) + 2 * S2 * c->in_ch * 9 * c->ch + 2 * S2 * m->L->norm_out.C * 9 * out_channels(c);
    for (int i = 0; i < m->L->n_blocks; i++) {
        const Block* k = &m->L->blocks[i];
        double HW = (double)k->H * k->W, Cx = k->C_in + k->C_skip, C = k->C_out;
        if (k->kind == BLOCK_RES)
            f += 2 * HW * (Cx * 9 * C + C * 9 * C + (k->nin_shortcut.w ? Cx * C : 0)) + 2 * E * C;
        else if (k->kind == BLOCK_ATTN) f += 2 * HW * 4 * C * C + 2 * 2 * HW * HW * C;
        else if (k->kind == BLOCK_DOWN) f += 2 * (HW / 4) * C * 9 * C;
        else f += 2 * (HW * 4) * C * 9 * C;
    }
    return f;
}

static int compare_double(const void* a, const void* b) {
    double x = *(const double*)a, y = *(const double*)b;
    return (x > y) - (x < y);
}

static double median(double* v, int n) {
    qsort(v, n, sizeof *v, compare_double);
    return n ? (n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2])) : 0;
}

static int arg_int(const char* flag, const char* v, int lo, int hi) {
    char* end;
    long x = strtol(v, &end, 10);
    if (*end || end == v || x < lo || x > hi) {
        fprintf(stderr, "bench_ddpm: %s %s: expected a whole number from %d to %d\n", flag, v, lo, hi);
        exit(2);
    }
    return (int)x;
}

#ifndef DDPM_PLAIN
// --winograd-table: the 3x3 convs of every preset's shapes (and a few more) by the direct
// conv, F(4x4, 3x3) and F(2x2, 3x3), each forced, beside the tile 17.2.1's rule takes: the
// measurements behind the rule (tests/README.md). Effective GFLOP/s, median of 5.
static int winograd_table(void) {
    static const int shapes[][3] = {{32, 32, 32}, {32, 64, 16}, {32, 64, 8}, {32, 64, 4}, {32, 64, 32}, {32, 128, 16},
        {32, 128, 8}, {8, 128, 32}, {8, 256, 16}, {8, 256, 8}, {8, 256, 4}, {64, 16, 32}, {1, 128, 32}, {1, 64, 8}, {2, 256, 4}};
    layers_init();
    printf("%s, %d threads: forward / backward (input + weight gradients), effective GFLOP/s\n", DDPM_ISA, kernel_threads);
    for (size_t k = 0; k < sizeof shapes / sizeof shapes[0]; k++) {
        int B = shapes[k][0], C = shapes[k][1], H = shapes[k][2], rule = wino_tile(B, C, C, H, H);
        double f[3], b[3];
        for (int i = 0; i < 3; i++) {
            wino_force = (int[3]){-1, 4, 2}[i];
            bench_conv3x3(B, C, H, 8, &f[i], &b[i]);
        }
        wino_force = 0;
        printf("B %3d, C %3d, %3dx%-3d direct %5.0f / %5.0f   F4 %5.0f / %5.0f (x%.2f / x%.2f)   F2 %5.0f / %5.0f (x%.2f / x%.2f)   rule: %s\n",
               B, C, H, H, f[0], b[0], f[1], b[1], f[1] / f[0], b[1] / b[0], f[2], b[2], f[2] / f[0], b[2] / b[0],
               rule == 4 ? "F4" : rule == 2 ? "F2" : "direct");
    }
    return 0;
}
#endif

// unet_forward of section 13, each part timed on its own: the timestep MLP and conv_in,
// each block of L->blocks, norm_out + conv_out. Medians of S passes, with the share of
// their sum (the whole pass: bench_ddpm's sample_ms, less p_sample's few elementwise ops).
static int blocks_table(UNet* m, const char* model, const float* x, int B, int S) {
    UNetLayers* L = m->L;
    int n = L->n_blocks + 2, ch = m->cfg.ch, E = 4 * ch, img = m->cfg.img, t_idx[4096];
    double* t = calloc_check((size_t)n * S, sizeof(double), "timings");
    for (int b = 0; b < B; b++) t_idx[b] = 500;
    m->train = 0, m->no_grad = 1;
    for (int s = -1; s < S; s++) {   // one pass first, untimed
        double t0 = now_seconds();
        unet_forward(m, x, t_idx, B);   // the same pass whole, so that every buffer is as it will be
        t0 = now_seconds();
        timestep_embedding(L->temb_sin, t_idx, B, ch);
        linear_forward(L->temb_h, L->temb_sin, L->dense0.w, L->dense0.b, B, ch, E);
        silu_forward(L->temb_a, L->temb_h, (size_t)B * E);
        linear_forward(L->temb, L->temb_a, L->dense1.w, L->dense1.b, B, E, E);
        silu_forward(L->temb_act, L->temb, (size_t)B * E);
        memcpy(L->x, x, (size_t)B * m->cfg.in_ch * img * img * sizeof(float));
        conv2d_forward(L->h0, L->x, L->conv_in.w, L->conv_in.b, B, m->cfg.in_ch, img, img, ch, 3, 1, L->conv_ws);
        if (s >= 0) t[s] = now_seconds() - t0;
        for (int i = 0; i < L->n_blocks; i++) {
            Block* k = &L->blocks[i];
            t0 = now_seconds();
            if (k->kind == BLOCK_RES) resblock_forward(m, k, B);
            else if (k->kind == BLOCK_ATTN) attnblock_forward(m, k, B);
            else resample_forward(m, k, B);
            if (s >= 0) t[(size_t)(i + 1) * S + s] = now_seconds() - t0;
        }
        t0 = now_seconds();
        norm_silu_conv_forward(L->eps_theta, L->a_out, L->mean_out, L->rstd_out, L->h_last, &L->norm_out,
                               &L->conv_out, B, img, img, NO_DROPOUT, L->conv_ws);
        if (s >= 0) t[(size_t)(n - 1) * S + s] = now_seconds() - t0;
    }
    double total = 0, med[1024];
    for (int i = 0; i < n && i < 1024; i++) total += med[i] = median(t + (size_t)i * S, S) * 1e3;
    printf("%s, %d threads, %s at batch %d, a sampling forward pass (medians of %d), ms and share:\n",
           DDPM_ISA, kernel_threads, model, B, S);
    for (int i = 0; i < n && i < 1024; i++) {
        const Block* k = i > 0 && i < n - 1 ? &L->blocks[i - 1] : NULL;
        printf("  %-22s %8.2f  %5.1f%%", i == 0 ? "temb + conv_in" : i == n - 1 ? "norm_out + conv_out" : k->name,
               med[i], 100 * med[i] / total);
        if (k) printf("   %d -> %d channels, input %dx%d", k->C_in + k->C_skip, k->C_out, k->H, k->W);
        printf("\n");
    }
    printf("  %-22s %8.2f\n", "sum", total);
    free(t);
    return 0;
}

int main(int argc, char** argv) {
    threads_spin_briefly(argv);   // as ./ddpm starts (section 18)
    const char* model = "tiny";
    int B = 128, S = 10, W = 2, table = 0;
    for (int i = 1; i < argc; i++) {
        const char* a = argv[i];
        if (!strcmp(a, "--winograd-table")) { table = 1; continue; }
        if (!strcmp(a, "--blocks")) { table = 2; continue; }
        if (i + 1 >= argc) { fprintf(stderr, "bench_ddpm: %s needs a value\n", a); return 2; }
        const char* v = argv[++i];
        if (!strcmp(a, "--model")) model = v;
        else if (!strcmp(a, "--batch")) B = arg_int(a, v, 1, 4096);
        else if (!strcmp(a, "--steps")) S = arg_int(a, v, 1, 100000);
        else if (!strcmp(a, "--warmup-steps")) W = arg_int(a, v, 0, 1000);
        else if (!strcmp(a, "--direct")) wino_force = -arg_int(a, v, 0, 1);   // 1: no Winograd (17.2.1)
#ifdef _OPENMP
        else if (!strcmp(a, "--threads")) omp_set_num_threads(arg_int(a, v, 1, 1024));
#endif
        else { fprintf(stderr, "bench_ddpm: unknown flag '%s'\n", a); return 2; }
    }
#ifndef DDPM_PLAIN
    if (table == 1) return winograd_table();
#else
    if (table) { fprintf(stderr, "bench_ddpm: --winograd-table: the reference layers have no Winograd\n"); return 2; }
#endif
    Config cfg;
    if (preset_find(model, 0, &cfg) != 1) { fprintf(stderr, "bench_ddpm: --model %s: unknown preset\n", model); return 2; }
    Trainer tr;
    trainer_init(&tr, &cfg, &PAPER_OBJECTIVE, B, 1, SCHEDULE_LINEAR, &PAPER_HYPER, 1);
    size_t n = (size_t)cfg.in_ch * cfg.img * cfg.img;
    Dataset noise = {"noise", B, cfg.in_ch, cfg.img, cfg.img, malloc_check((size_t)B * n, "bench images"), NULL, 0};
    for (size_t i = 0; i < (size_t)B * n; i++) noise.pixels[i] = (uint8_t)(rng_u64(&tr.rng) >> 56);
    if (table == 2) {
        float* x = malloc_check((size_t)B * n * sizeof(float), "bench images");
        rng_normal(&tr.rng, x, (size_t)B * n);
        int rc = blocks_table(&tr.net, model, x, B, S);
        free(x); free(noise.pixels);
        trainer_free(&tr);
        return rc;
    }
    double* tt = malloc_check((size_t)S * sizeof(double), "timings");
    double* ts = malloc_check((size_t)S * sizeof(double), "timings");
    for (int i = 0; i < W + S; i++) {
        double t0 = now_seconds();
        train_step(&tr, &noise);
        if (i >= W) tt[i - W] = 1e3 * (now_seconds() - t0);
    }
    Chain sb;
    chain_init(&sb, B, n, NULL);
    rng_normal(&tr.rng, tr.x_t, B * n);
    Sampler sp = {tr.obj.mean, tr.obj.var, 0, 0};
    tr.net.train = 0;
    tr.net.no_grad = 1;
    for (int i = 0; i < W + S; i++) {
        double t0 = now_seconds();
        for (int b = 0; b < B; b++) sb.t_idx[b] = 500;
        const float* eps_theta = unet_forward(&tr.net, tr.x_t, sb.t_idx, B);
        p_sample(tr.x_t, eps_theta, sb.t_idx, B, n, &sp, &tr.sched, &sb, &tr.rng);
        if (i >= W) ts[i - W] = 1e3 * (now_seconds() - t0);
    }
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);   // before the kernel timings below, which allocate their own
    double peak = fma_peak_gflops(), mm = matmul_gflops();
#ifdef DDPM_PLAIN
    printf("{\"impl\": \"ddpm.c\", \"isa\": \"reference\", \"vector_floats\": 1, \"registers\": 0, "
           "\"tiles\": \"none (the reference layers of section 16)\", \"fma_peak_gflops\": %.1f, "
           "\"matmul_gflops\": %.1f, \"conv3x3\": [", peak, mm);
#else
    printf("{\"impl\": \"ddpm.c\", \"isa\": \"%s\", \"vector_floats\": %d, \"registers\": %d, "
           "\"tiles\": \"conv %dx%d, wide %dx%d, small %dx%d, dweight %dx%d, gemm %dx%d\", \"fma_peak_gflops\": %.1f, "
           "\"matmul_gflops\": %.1f, \"conv3x3\": [",
           DDPM_ISA, VW, VEC_REGS, CONV_MR, CONV_NR, CONV_MR_WIDE, CONV_NR_WIDE, CONV_MR, CONV_NR_SMALL, CONV_DW_K, CONV_DW_CO,
           GEMM_MR, GEMM_NR, peak, mm);
#endif
    for (int l = 0; l < cfg.n_levels; l++) {
        int C = cfg.ch * cfg.ch_mult[l], H = cfg.img >> l, force = wino_force, reps = S > 5 ? 5 : S;
        double f = 0, b = 0, fd = 0, bd = 0;
        bench_conv3x3(B, C, H, reps, &f, &b);
        wino_force = -1;   // the direct conv beside it
        bench_conv3x3(B, C, H, reps, &fd, &bd);
        wino_force = force;
        printf("%s{\"C\": %d, \"H\": %d, \"fwd_gflops\": %.1f, \"bwd_gflops\": %.1f, \"winograd\": %d, "
               "\"fwd_direct_gflops\": %.1f, \"bwd_direct_gflops\": %.1f}", l ? ", " : "", C, H, f, b,
               wino_tile(B, C, C, H, H), fd, bd);
    }
    printf("], \"model\": \"%s\", \"batch\": %d, \"threads\": %d, \"params\": %zu, "
           "\"train_ms_all\": [", model, B, max_threads(), tr.net.n_params);
    for (int i = 0; i < S; i++) printf("%s%.3f", i ? ", " : "", tt[i]);
    printf("], \"sample_ms_all\": [");
    for (int i = 0; i < S; i++) printf("%s%.3f", i ? ", " : "", ts[i]);
    printf("], \"train_ms\": %.3f, \"sample_ms\": %.3f, \"fwd_gflop\": %.4f, \"max_rss_mb\": %.1f, \"blas\": \"none (ddpm.c matmul)\"}\n",
           median(tt, S), median(ts, S), unet_forward_flops(&tr.net) * B / 1e9, ru.ru_maxrss / 1024.0);
    chain_free(&sb);
    free(tt); free(ts); free(noise.pixels);
    trainer_free(&tr);
    return fflush(stdout) == 0 ? 0 : 1;
}
