// dump_ref: writes the exchange file that tests/reference.py checks against PyTorch.
//
//   tests/dump_ref PRESET[+m2][@N][/W] BATCH FILE [MEAN,VAR,LOSS]   (+m2: the first channel multiplier 2;
//                                                              @N: the preset at image side N;
//                                                              /W: at base width ch = W, groups W/4,
//                                                              as paper256's 128 and 32)
//   tests/dump_ref --checkpoint CKPT BATCH FILE
//   tests/dump_ref --dpm K FILE                         (DPM-Solver++'s chain, below)
//
// It builds the U-Net of a preset with random weights (not the official init, whose
// 1e-10 scales would silence whole branches and hide their gradients), runs one
// forward and backward pass of L_simple (Eq. 14) on a random x_t, t, eps with
// dropout off, and writes config, weights, inputs, eps_theta, the loss and every
// parameter gradient. Format (little-endian): "DDPMREF1", int32 n_records, then per
// record: int32 name_len, name, int32 ndim, int32 shape[ndim], float32 data.
//
// With MEAN,VAR,LOSS (e.g. eps,learned,kl or mu,fixedlarge,mse: Table 2's objectives,
// ddpm.c sections 3-5) the step is that objective's instead: x_0 on the 0..255 grid,
// x_t = q_sample(x_0, eps) at t = 1 for the first image (the decoder L_0) and a random t
// for the others, training_loss and its gradient. The file then also holds x_0, the
// objective, and one bound term per image with its gradient with respect to p_theta's
// mean and log variance (vb_term_bpd_grad, for the KL and the decoder on their own).
//
// With --checkpoint the weights are a checkpoint's EMA weights instead (its network, the
// paper's objective), and the file holds the inputs, eps_theta and the loss only (no
// backward pass, no weights: the 256x256 model's would be 900 MB): tests/test_official.py
// checks that weights converted from another layout give ddpm.c the eps_theta of the
// model they came from.
//
// With --dpm K the file holds a chain of DPM-Solver++(2M) (ddpm.c 10.2) instead: tiny's
// network with random weights samples 2 images in K steps, even in log-SNR, and the file
// holds x_T, the steps' t, and each step's eps_theta and x after it; reference.py redoes
// the steps in float64 from those eps_theta (its own transcription of the update).
#define DDPM_NO_MAIN
#include "../ddpm.c"

// --dpm K: the chain of reverse_chain with SAMPLER_DPM, step by step, with what it saw.
static int dump_dpm(UNet* m, const Config* cfg, int K, const char* path, Rng* rng) {
    int B = 2, shape[4] = {B, cfg->in_ch, cfg->img, cfg->img};
    size_t n = (size_t)cfg->in_ch * cfg->img * cfg->img;
    Schedule trained, s;
    schedule_init(&trained, 1000, SCHEDULE_LINEAR);
    schedule_respace(&s, &trained, K, 1);
    Sampler sp = {MEAN_EPS, VAR_FIXEDLARGE, SAMPLER_DPM, 0};
    Chain ch;
    chain_init(&ch, B, n, NULL);
    ch.h_prev = 0;
    float* x = malloc_check(B * n * sizeof(float), "x");
    float t_f[1000];
    rng_normal(rng, x, B * n);
    ExWriter w;
    if (ex_begin(&w, path) != 0) return 1;
    ex_config(&w, cfg);
    ex_record(&w, "dpm.x_T", 4, shape, x);
    m->train = 0, m->no_grad = 1;
    char name[64];
    for (int t_idx = K - 1; t_idx >= 0; t_idx--) {
        for (int b = 0; b < B; b++) ch.t_idx[b] = t_idx, ch.t_model[b] = s.t_model[t_idx];
        const float* out = unet_forward(m, x, ch.t_model, B);
        snprintf(name, sizeof name, "dpm.eps.%d", K - 1 - t_idx);
        ex_record(&w, name, 4, shape, out);
        dpm_solver_sample(x, out, ch.t_idx, B, n, &sp, &s, &ch);
        snprintf(name, sizeof name, "dpm.x.%d", K - 1 - t_idx);
        ex_record(&w, name, 4, shape, x);
        t_f[K - 1 - t_idx] = (float)s.t_model[t_idx];
    }
    ex_record(&w, "dpm.t", 1, &K, t_f);
    if (ex_finish(&w) != 0) return 1;
    printf("dump_ref: DPM-Solver++(2M), %d steps on tiny -> %s\n", K, path);
    return 0;
}

int main(int argc, char** argv) {
    const char* ckpt = NULL;
    int dpm_steps = 0;
    if (argc == 5 && !strcmp(argv[1], "--checkpoint")) ckpt = argv[2], argv++, argc--;
    if (argc == 4 && !strcmp(argv[1], "--dpm")) dpm_steps = atoi(argv[2]), argv[1] = "tiny", argv[2] = "2";
    if (argc == 4 && dpm_steps < 1 && !strcmp(argv[1], "--dpm")) die("--dpm K: expected 1 to 1000 steps");
    if (dpm_steps > 1000) die("--dpm K: expected 1 to 1000 steps");
    if (argc != 4 && argc != 5) {
        fprintf(stderr, "usage: %s PRESET BATCH FILE [MEAN,VAR,LOSS] | --checkpoint CKPT BATCH FILE\n", argv[0]);
        return 2;
    }
    Config cfg;
    CheckpointHeader hd;
    if (ckpt) fclose(checkpoint_open(ckpt, &hd)), cfg = config_from_header(&hd);
    else {   // PRESET, PRESET+m2 (its first channel multiplier 2 instead of 1), PRESET@N (at side N),
             // PRESET/W (at width W)
        char name[32];
        snprintf(name, sizeof name, "%s", argv[1]);
        char* slash = strchr(name, '/');
        int width = slash ? atoi(slash + 1) : 0;
        if (slash) *slash = 0;
        char* at = strchr(name, '@');
        int img = at ? atoi(at + 1) : 0;
        if (at) *at = 0;
        char* plus = strstr(name, "+m2");
        if (plus) *plus = 0;
        if (preset_find(name, img, &cfg) != 1 || config_check(&cfg, NULL)) die("unknown preset %s", argv[1]);
        if (plus) cfg.ch_mult[0] = 2;
        if (width) cfg.ch = width, cfg.groups = width / 4;
        if (config_check(&cfg, NULL)) die("%s: %s", argv[1], config_check(&cfg, NULL));
    }
    Objective ob = PAPER_OBJECTIVE;
    int with_objective = argc == 5;
    if (with_objective) {
        char mt[16], vt[16], lt[16];
        if (sscanf(argv[4], "%15[^,],%15[^,],%15s", mt, vt, lt) != 3) die("objective: expected MEAN,VAR,LOSS");
        ob.mean = (MeanType)-1; ob.var = (VarType)-1; ob.loss = (LossType)-1;
        for (int i = 0; i < 3; i++) {
            if (!strcmp(mt, MEAN_NAMES[i])) ob.mean = (MeanType)i;
            if (!strcmp(vt, VAR_NAMES[i])) ob.var = (VarType)i;
            if (!strcmp(lt, LOSS_NAMES[i])) ob.loss = (LossType)i;
        }
        if ((int)ob.mean < 0 || (int)ob.var < 0 || (int)ob.loss < 0 || objective_check(&ob, NULL))
            die("objective %s: not a trainable MEAN,VAR,LOSS", argv[4]);
        cfg.learn_sigma = ob.var == VAR_LEARNED;
    }
    int B = atoi(argv[2]);
    UNet m;
    Rng rng;
    rng_seed(&rng, 1234);
    if (ckpt) {
        Schedule trained;
        load_ema_model(&m, &trained, NULL, ckpt, B);
        schedule_free(&trained);
    } else {
        unet_build(&m, &cfg, B);
    }
    for (int i = 0; !ckpt && i < m.L->n_tensors; i++) {
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
    if (dpm_steps > 0) return dump_dpm(&m, &cfg, dpm_steps, argv[3], &rng);
    size_t n = (size_t)B * cfg.in_ch * cfg.img * cfg.img, per = n / B, n_out = n / cfg.in_ch * out_channels(&cfg);
    float* x_t = malloc_check(n * sizeof(float), "x_t");
    float* x_0 = malloc_check(n * sizeof(float), "x_0");
    float* eps = malloc_check(n * sizeof(float), "eps");
    float* d_eps = malloc_check(n_out * sizeof(float), "d eps_theta");
    float* work = malloc_check(4 * per * sizeof(float), "loss buffers");
    int* t_idx = malloc_check(B * sizeof(int), "t");
    float* t_f = malloc_check(B * sizeof(float), "t");
    rng_normal(&rng, x_t, n);
    rng_normal(&rng, eps, n);
    for (int b = 0; b < B; b++) { t_idx[b] = rng_int(&rng, 1000); t_f[b] = (float)t_idx[b]; }
    Schedule s;
    schedule_init(&s, 1000, SCHEDULE_LINEAR);
    if (with_objective) {
        for (size_t i = 0; i < n; i++) x_0[i] = rng_int(&rng, 256) / 127.5f - 1.0f;
        t_idx[0] = 0;
        t_f[0] = 0;
        for (int b = 1; b < B; b++) { t_idx[b] = 1 + rng_int(&rng, 999); t_f[b] = (float)t_idx[b]; }
        q_sample(x_t, x_0, eps, t_idx, B, per, &s);
    }
    m.train = 0;
    m.no_grad = ckpt != NULL;   // a checkpoint's file holds the forward pass alone
    unet_zero_grad(&m);
    float* eps_theta = unet_forward(&m, x_t, t_idx, B);
    float loss = (float)training_loss(d_eps, eps_theta, x_0, x_t, eps, t_idx, B, per, &ob, &s, work);
    if (!ckpt) unet_backward(&m, d_eps, B);

    // ddpm.c's own exchange writer (section 21), as ./ddpm export uses it
    ExWriter w;
    if (ex_begin(&w, argv[3]) != 0) return 1;
    ex_config(&w, &cfg);
    int shape[4] = {B, cfg.in_ch, cfg.img, cfg.img}, one = 1, oshape[4] = {B, out_channels(&cfg), cfg.img, cfg.img};
    ex_record(&w, "input.x_t", 4, shape, x_t);
    ex_record(&w, "input.t", 1, &B, t_f);
    ex_record(&w, "input.eps", 4, shape, eps);
    ex_record(&w, "output.eps_theta", 4, oshape, eps_theta);
    ex_record(&w, "output.loss", 1, &one, &loss);
    if (with_objective) {
        int kinds[3] = {ob.mean, ob.var, ob.loss}, three = 3;
        ex_ints(&w, "config.objective", kinds, three);
        ex_record(&w, "input.x_0", 4, shape, x_0);
        ex_record(&w, "output.d_out", 4, oshape, d_eps);
        // One bound term per image on its own: p_theta's mean and log variance drawn
        // here (not through the network), the posterior of Eqs. (6)-(7) from x_0, x_t.
        float* mean_q = malloc_check(n * sizeof(float), "terms");
        float* mean_p = malloc_check(n * sizeof(float), "terms");
        float* lv_p = malloc_check(n * sizeof(float), "terms");
        float* d_mean = malloc_check(n * sizeof(float), "terms");
        float* d_lv = malloc_check(n * sizeof(float), "terms");
        float* lv_q = malloc_check(B * sizeof(float), "terms");
        float* value = malloc_check(B * sizeof(float), "terms");
        for (int b = 0; b < B; b++) {
            double lq;
            q_posterior_mean_variance(mean_q + b * per, NULL, &lq, x_0 + b * per, x_t + b * per, t_idx + b, 1, per, &s);
            lv_q[b] = (float)lq;
            double lp = p_log_variance(t_idx[b], VAR_FIXEDLARGE, &s);
            for (size_t i = b * per; i < (b + 1) * per; i++) {
                float z[2];
                rng_normal(&rng, z, 2);
                mean_p[i] = mean_q[i] + (float)exp(0.5 * lp) * z[0];
                lv_p[i] = (float)(lp + 0.3 * z[1]);
            }
            // the posterior's log variance as the float the file holds
            value[b] = (float)vb_term_bpd_grad(d_mean + b * per, d_lv + b * per, 1.0, x_0 + b * per, mean_q + b * per,
                                               (double)lv_q[b], mean_p + b * per, lv_p + b * per, t_idx[b], per);
        }
        ex_record(&w, "term.mean_q", 4, shape, mean_q);
        ex_record(&w, "term.logvar_q", 1, &B, lv_q);
        ex_record(&w, "term.mean_p", 4, shape, mean_p);
        ex_record(&w, "term.logvar_p", 4, shape, lv_p);
        ex_record(&w, "term.value", 1, &B, value);
        ex_record(&w, "term.d_mean", 4, shape, d_mean);
        ex_record(&w, "term.d_logvar", 4, shape, d_lv);
    }
    char name[80];
    for (int i = 0; !ckpt && i < m.L->n_tensors; i++) {
        ParamTensor* t = &m.L->tensors[i];
        snprintf(name, sizeof name, "param.%s", t->name);
        ex_record(&w, name, t->ndim, t->shape, m.params + t->offset);
        snprintf(name, sizeof name, "grad.%s", t->name);
        ex_record(&w, name, t->ndim, t->shape, m.grads + t->offset);
    }
    if (ex_finish(&w) != 0) return 1;
    printf("dump_ref: %s batch %d, %zu parameters, loss %.6f -> %s\n", argv[1], B, m.n_params, loss, argv[3]);
    unet_free(&m);
    return 0;
}
