// test_ddpm: the C unit tests of ddpm.c.
//
//   make tests/test_ddpm && tests/test_ddpm
//
// Every check prints one line, "PASS name: detail" or "FAIL name: detail", and the last
// line is "N passed, N failed" (tests/run.sh sums it); the exit status is 1 if any check
// failed. ddpm.c is included whole with its main() compiled out, so every static function
// is reachable. Temporary files go under tests/out/unit/ and are removed at the end.
//
// What is checked, by section of ddpm.c:
//   2     the schedules, against values recomputed here in long double
//   3-4   q(x_t|x_0) by Monte Carlo, against Eq. (4) and against iterating Eq. (2);
//         the posterior of Eqs. (6)-(7) against a Bayes product of Gaussians; Eq. (11)
//   5-6   the Gaussian KL against numerical integration; the decoder's 256 bins sum to 1;
//         L_T ~ 1e-5 bits/dim (§4); L_simple and its gradient
//   10-11 fewer steps: respaced betas recomputed here, K = T is Alg. 2 bit for bit, DDIM
//         eta = 0 deterministic and eta = 1 = DDPM's posterior variance; bpd --per-t terms
//         sum to the total; reconstructions at t = 1 and T; interpolation ends = reconstructions
//   12-16 every layer's backward pass against central finite differences (the layers
//         the network runs: Part III's, or section 16's in a -DDDPM_PLAIN build), the
//         whole U-Net's gradient by finite differences, bit-exact determinism, the
//         initialisation, the configs
//   17    (not in a -DDDPM_PLAIN build) every fast kernel against its reference layer of
//         section 16 on awkward shapes, matmul against a triple loop, thread counts
//   18    the data loaders on synthetic files, and every bad-data case (fork + exit 1)
//   19    checkpoints: bit-exact round trip, resume, every corruption, failed saves
//   20    .npy files
#define DDPM_NO_MAIN
// The tests use most of ddpm.c but not all of it (e.g. the PNG writers): silence the
// warnings about the unused static functions of the included file only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#include "../ddpm.c"
#pragma GCC diagnostic pop

#include <fcntl.h>
#include <ftw.h>
#include <stddef.h>
#include <sys/wait.h>

#define OUT "tests/out/unit"

// float32's unit roundoff: half an ulp at 1, 2^-24 ~ 6e-8. FLT_EPSILON = 2u is one ulp.
#define U_F32 (FLT_EPSILON / 2)

// ----------------------------------------------------------------------------
// The harness

static int n_passed, n_failed;

#if defined(__GNUC__)
__attribute__((format(printf, 3, 4)))
#endif
static void check(const char* name, int cond, const char* fmt, ...) {
    char detail[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(detail, sizeof detail, fmt, ap);
    va_end(ap);
    printf("%s %s: %s\n", cond ? "PASS" : "FAIL", name, detail);
    fflush(stdout);
    if (cond) n_passed++; else n_failed++;
}

static void note(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    printf("NOTE ");
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    fflush(stdout);
}

// max |a_i - b_i|; a NaN anywhere makes it infinite, so that it never passes
static double max_abs_diff(const float* a, const float* b, size_t n) {
    double m = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - (double)b[i]);
        if (!(d <= m)) m = isnan(d) ? INFINITY : d;
    }
    return m;
}

static double max_abs(const float* a, size_t n) {
    double m = 0;
    for (size_t i = 0; i < n; i++) if (fabs(a[i]) > m) m = fabs(a[i]);
    return m;
}

// Passes iff max |got - want| <= tol (an absolute tolerance, chosen by the caller).
static void check_tensor(const char* name, const float* got, const float* want, size_t n, double tol) {
    double d = max_abs_diff(got, want, n);
    check(name, d <= tol, "max |diff| %.3g, tol %.3g (max |ref| %.3g, %zu values)", d, tol, max_abs(want, n), n);
}

// ----------------------------------------------------------------------------
// Small utilities

static Rng trng;   // the tests' own random stream, fixed seed

static float* fmalloc(size_t n) { return calloc_check(n, sizeof(float), "test buffer"); }

static float* randn(size_t n, float scale) {
    float* x = fmalloc(n);
    rng_normal(&trng, x, n);
    for (size_t i = 0; i < n; i++) x[i] *= scale;
    return x;
}

// A dataset of 8 noise images of the network's shape, for training steps whose pixels do
// not matter (made once per shape, from its own seed, so every test sees the same one).
static Dataset* noise_data(const Config* c) {
    static Dataset d[4];
    static int n;
    for (int i = 0; i < n; i++)
        if (d[i].C == c->in_ch && d[i].H == c->img) return &d[i];
    if (n == 4) die("test: noise_data holds 4 shapes");
    Dataset* x = &d[n++];
    snprintf(x->name, sizeof x->name, "noise");
    x->N = 8; x->C = c->in_ch; x->H = x->W = c->img;
    size_t k = (size_t)8 * c->in_ch * c->img * c->img;
    x->pixels = malloc_check(k, "noise images");
    Rng r;
    rng_seed(&r, 99);
    for (size_t i = 0; i < k; i++) x->pixels[i] = (uint8_t)(rng_u64(&r) >> 56);
    return x;
}

static float* fcopy(const float* x, size_t n) {
    float* y = fmalloc(n);
    memcpy(y, x, n * sizeof(float));
    return y;
}

static void set_threads(int n) {
#ifdef _OPENMP
    omp_set_num_threads(n);
#else
    (void)n;
#endif
}

static int get_threads(void) { return max_threads(); }

// The fast kernels size their per-thread scratch and their tile widths from the thread
// count seen by layers_init, once. To compare runs as if the program had been started
// with different --threads values, drop matmul's buffers and size them again.
static void layers_reinit(int threads) {
    set_threads(threads);
#ifndef DDPM_PLAIN
    free(gemm_pack_buffer);
    gemm_pack_buffer = NULL;
#endif
    layers_init();
}

static void mkdir_or_die(const char* path) {
    if (mkdir(path, 0755) != 0 && errno != EEXIST) die("test: cannot create %s: %s", path, strerror(errno));
}

static void write_bytes(const char* path, const void* data, size_t n) {
    FILE* f = fopen_check(path, "wb", NULL);
    if (n && fwrite(data, 1, n, f) != n) die("test: cannot write %s", path);
    if (fclose(f) != 0) die("test: cannot write %s", path);
}

// Reads a whole file; returns NULL if it cannot be opened. *n gets its size.
static uint8_t* read_bytes(const char* path, size_t* n) {
    FILE* f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t* buf = malloc_check(size > 0 ? (size_t)size : 1, "test file");
    *n = fread(buf, 1, (size_t)size, f);
    fclose(f);
    return buf;
}

static int exists(const char* path) { return access(path, F_OK) == 0; }

static int rm_entry(const char* path, const struct stat* st, int flag, struct FTW* ftw) {
    (void)st; (void)flag; (void)ftw;
    chmod(path, 0755);   // a folder a test made read-only
    return remove(path);
}

static void rm_rf(const char* path) {
    if (exists(path)) nftw(path, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

// Runs fn(arg) in a child process whose stderr goes to a file, and checks that it ends
// the way every user-caused failure in ddpm.c must: exit(1) (not a crash, not a
// return) with one line "ddpm: ..." that names `must_name` (the offending file).
static void expect_die(const char* name, void (*fn)(void*), void* arg, const char* must_name) {
    const char* errpath = OUT "/child_stderr.txt";
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid < 0) { check(name, 0, "fork failed: %s", strerror(errno)); return; }
    if (pid == 0) {
        if (!freopen(errpath, "w", stderr)) _exit(3);
        fn(arg);
        _exit(0);   // it returned: the bad input was accepted
    }
    int status = 0;
    waitpid(pid, &status, 0);
    size_t n = 0;
    uint8_t* msg = read_bytes(errpath, &n);
    char text[1024] = "";
    if (msg) { snprintf(text, sizeof text, "%.*s", (int)(n < 1000 ? n : 1000), (const char*)msg); free(msg); }
    int lines = 0;
    for (const char* p = text; *p; p++) lines += *p == '\n';
    size_t len = strlen(text);
    if (len && text[len - 1] == '\n') text[len - 1] = 0;
    unlink(errpath);
    if (WIFSIGNALED(status)) { check(name, 0, "crashed with signal %d", WTERMSIG(status)); return; }
    int code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    int ok = code == 1 && lines == 1 && !strncmp(text, "ddpm: ", 6) && strstr(text, must_name);
    if (code == 0) check(name, 0, "accepted: the call returned without an error");
    else check(name, ok, "exit %d, %d line(s): \"%s\"%s", code, lines, text,
               strstr(text, must_name) ? "" : " (does not name the file)");
}

// ----------------------------------------------------------------------------
// 2. The noise schedule

static double rel_err(long double got, long double want) {
    long double d = fabsl(got - want), s = fabsl(want);
    return (double)(s > 0 ? d / s : d);
}

static void test_schedule_linear(void) {
    const int T = 1000;
    Schedule s;
    schedule_init(&s, T, SCHEDULE_LINEAR);
    // Recomputed here in long double, straight from §2, §4 and Eq. (7).
    double e_beta = 0, e_abar = 0, e_abar_prev = 0, e_sqrt = 0, e_var = 0, e_logvar = 0, e_coef = 0;
    long double abar = 1, var1 = 0;
    for (int i = 0; i < T; i++) {
        long double beta = 1e-4L + (0.02L - 1e-4L) * i / (T - 1), prev = abar;
        abar *= 1 - beta;
        long double var = beta * (1 - prev) / (1 - abar);
        if (i == 1) var1 = var;
        e_beta = fmax(e_beta, rel_err(s.betas[i], beta));
        e_beta = fmax(e_beta, rel_err(s.alphas[i], 1 - beta));
        e_abar = fmax(e_abar, rel_err(s.alphas_cumprod[i], abar));
        e_abar_prev = fmax(e_abar_prev, rel_err(s.alphas_cumprod_prev[i], prev));
        e_sqrt = fmax(e_sqrt, rel_err(s.sqrt_alphas_cumprod[i], sqrtl(abar)));
        e_sqrt = fmax(e_sqrt, rel_err(s.sqrt_one_minus_alphas_cumprod[i], sqrtl(1 - abar)));
        e_sqrt = fmax(e_sqrt, rel_err(s.sqrt_recip_alphas_cumprod[i], sqrtl(1 / abar)));
        e_sqrt = fmax(e_sqrt, rel_err(s.sqrt_recipm1_alphas_cumprod[i], sqrtl(1 / abar - 1)));
        e_var = fmax(e_var, i == 0 ? fabs(s.posterior_variance[0]) : rel_err(s.posterior_variance[i], var));
        e_coef = fmax(e_coef, rel_err(s.posterior_mean_coef1[i], beta * sqrtl(prev) / (1 - abar)));
        e_coef = fmax(e_coef, i == 0 ? fabs(s.posterior_mean_coef2[0])
                                     : rel_err(s.posterior_mean_coef2[i], (1 - prev) * sqrtl(1 - beta) / (1 - abar)));
    }
    // the clipped log: beta_tilde_1 = 0 is replaced by beta_tilde_2
    abar = 1;
    for (int i = 0; i < T; i++) {
        long double beta = 1e-4L + (0.02L - 1e-4L) * i / (T - 1), prev = abar;
        abar *= 1 - beta;
        long double lv = i == 0 ? logl(var1) : logl(beta * (1 - prev) / (1 - abar));
        e_logvar = fmax(e_logvar, fabsl(s.posterior_log_variance_clipped[i] - lv));
    }
    // Tolerances: beta_t is one formula (a few double roundings: 1e-14). alpha_bar is a
    // product of up to 1000 factors, each rounded once: <= 1000 * 1.1e-16 ~ 1e-13, so 1e-12.
    // Everything built on 1 - alpha_bar inherits that error magnified by
    // alpha_bar / (1 - alpha_bar) <= 1e4 at t = 1: 1e-16 * 1e4 = 1e-12, so 1e-10.
    check("schedule linear beta_t, alpha_t", e_beta < 1e-14, "max rel err %.2g (tol 1e-14), beta_1 %.6g, beta_T %.6g",
          e_beta, s.betas[0], s.betas[T - 1]);
    check("schedule linear alpha_bar_t", e_abar < 1e-12 && e_abar_prev < 1e-12,
          "max rel err %.2g, prev %.2g (tol 1e-12), alpha_bar_T %.4g", e_abar, e_abar_prev, s.alphas_cumprod[T - 1]);
    check("schedule linear sqrt terms", e_sqrt < 1e-10, "max rel err %.2g (tol 1e-10)", e_sqrt);
    check("schedule linear beta_tilde (Eq. 7)", e_var < 1e-10, "max rel err %.2g (tol 1e-10), beta_tilde_1 = %g",
          e_var, s.posterior_variance[0]);
    check("schedule linear log beta_tilde clipped", e_logvar < 1e-10, "max abs err %.2g (tol 1e-10), [0] = log beta_tilde_2 = %.6f",
          e_logvar, s.posterior_log_variance_clipped[0]);
    check("schedule linear posterior coef1, coef2", e_coef < 1e-10, "max rel err %.2g (tol 1e-10)", e_coef);
    schedule_free(&s);
}

static void test_schedule_cosine(void) {
    const int T = 1000;
    const long double s0 = 0.008L, pi = acosl(-1.0L);
    Schedule s;
    schedule_init(&s, T, SCHEDULE_COSINE);
    // Nichol & Dhariwal: alpha_bar(t) = f(t) / f(0), f(t) = cos^2(((t/T + s)/(1 + s)) pi/2),
    // as long as no beta has been clipped (the product then telescopes).
    long double f0 = cosl(s0 / (1 + s0) * pi / 2);
    f0 *= f0;
    double e = 0;
    int n_unclipped = 0, monotone = 1, in_range = 1;
    for (int i = 0; i < T; i++) {
        if (!(s.betas[i] > 0 && s.betas[i] <= 0.999)) in_range = 0;
        if (i > 0 && s.betas[i] < s.betas[i - 1]) monotone = 0;
        if (s.betas[i] >= 0.999) break;
        long double c = cosl(((long double)(i + 1) / T + s0) / (1 + s0) * pi / 2);
        e = fmax(e, rel_err(s.alphas_cumprod[i], c * c / f0));
        n_unclipped++;
    }
    for (int i = n_unclipped; i < T; i++) {
        if (!(s.betas[i] > 0 && s.betas[i] <= 0.999)) in_range = 0;
        if (i > 0 && s.betas[i] < s.betas[i - 1]) monotone = 0;
    }
    // each ratio f(t)/f(t-1) carries a few roundings; the product of < 1000 of them
    // telescopes to within ~1e-13 relative: 1e-9 leaves room for cos near pi/2.
    check("schedule cosine alpha_bar = f(t)/f(0)", e < 1e-9 && n_unclipped >= T - 5,
          "max rel err %.2g over the %d unclipped steps (tol 1e-9)", e, n_unclipped);
    check("schedule cosine betas in (0, 0.999], clipped at T, monotone",
          in_range && monotone && s.betas[T - 1] == 0.999,
          "beta_1 %.3g, beta_T %.6g, monotone %d", s.betas[0], s.betas[T - 1], monotone);
    schedule_free(&s);
}

// ----------------------------------------------------------------------------
// 3. The forward process, by Monte Carlo

typedef struct { double mean, var; } Moments;

static Moments moments(const double* x, size_t n) {
    double s = 0, ss = 0;
    for (size_t i = 0; i < n; i++) s += x[i];
    double m = s / n;
    for (size_t i = 0; i < n; i++) ss += (x[i] - m) * (x[i] - m);
    return (Moments){m, ss / (n - 1)};
}

static void test_q_sample_monte_carlo(void) {
    const int T = 1000, n_q = 200000, n_chain = 100000;
    const int ts[4] = {0, 99, 499, 999};
    const float x0_val = 0.7f;
    Schedule s;
    schedule_init(&s, T, SCHEDULE_LINEAR);
    // q_sample at each t, in one jump (Eq. 4)
    float* x0 = fmalloc(n_q);
    float* eps = fmalloc(n_q);
    float* xt = fmalloc(n_q);
    double* xd = malloc_check(n_q * sizeof(double), "test");
    for (int i = 0; i < n_q; i++) x0[i] = x0_val;
    Moments q[4];
    for (int k = 0; k < 4; k++) {
        rng_normal(&trng, eps, n_q);
        q_sample(xt, x0, eps, &ts[k], 1, n_q, &s);
        for (int i = 0; i < n_q; i++) xd[i] = xt[i];
        q[k] = moments(xd, n_q);
    }
    // the chain of Eq. (2), step by step: x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) z
    double* chain = malloc_check(n_chain * sizeof(double), "test");
    float* z = fmalloc(n_chain);
    Moments c[4];
    for (int i = 0; i < n_chain; i++) chain[i] = x0_val;
    for (int t = 0, k = 0; t < T; t++) {
        double a = sqrt(1 - s.betas[t]), b = sqrt(s.betas[t]);
        rng_normal(&trng, z, n_chain);
        for (int i = 0; i < n_chain; i++) chain[i] = a * chain[i] + b * z[i];
        if (t == ts[k]) c[k++] = moments(chain, n_chain);
        if (k == 4) break;
    }
    // Tolerance: 5 standard errors. For n Gaussian samples of variance v, the sample mean
    // has standard error sqrt(v/n) and the sample variance v sqrt(2/(n-1)). The float
    // rounding of x_t (~1e-7 relative) is far below either.
    for (int k = 0; k < 4; k++) {
        double mu = sqrt(s.alphas_cumprod[ts[k]]) * x0_val, v = 1 - s.alphas_cumprod[ts[k]];
        double se_m = sqrt(v / n_q), se_v = v * sqrt(2.0 / (n_q - 1));
        char name[96];
        snprintf(name, sizeof name, "q_sample moments vs Eq. (4), t = %d", ts[k] + 1);
        check(name, fabs(q[k].mean - mu) < 5 * se_m && fabs(q[k].var - v) < 5 * se_v,
              "mean %.6f vs %.6f (%.1f se), var %.6g vs %.6g (%.1f se)", q[k].mean, mu,
              fabs(q[k].mean - mu) / se_m, q[k].var, v, fabs(q[k].var - v) / se_v);
        // the chain against q_sample: the difference of two independent estimates
        double se_m2 = sqrt(v / n_q + v / n_chain), se_v2 = v * sqrt(2.0 / (n_q - 1) + 2.0 / (n_chain - 1));
        snprintf(name, sizeof name, "q_sample vs iterating Eq. (2), t = %d", ts[k] + 1);
        check(name, fabs(q[k].mean - c[k].mean) < 5 * se_m2 && fabs(q[k].var - c[k].var) < 5 * se_v2,
              "chain mean %.6f var %.6g; jump mean %.6f var %.6g (%.1f, %.1f se)", c[k].mean, c[k].var,
              q[k].mean, q[k].var, fabs(q[k].mean - c[k].mean) / se_m2, fabs(q[k].var - c[k].var) / se_v2);
    }
    free(x0); free(eps); free(xt); free(xd); free(chain); free(z);
    schedule_free(&s);
}

// ----------------------------------------------------------------------------
// 3-4. The posterior (Eqs. 6-7), x_0 from eps, Eq. (11), the reverse variances

static void test_posterior_bayes(void) {
    const int T = 1000;
    Schedule s;
    schedule_init(&s, T, SCHEDULE_LINEAR);
    const int ts[5] = {0, 1, 10, 500, 999};
    const float x0s[3] = {-1.0f, 0.3f, 0.9f}, xts[3] = {-2.0f, 0.1f, 1.5f};
    double e_mean = 0, e_var = 0, e_lv = 0;
    for (int a = 0; a < 5; a++) {
        int t = ts[a];
        // the schedule, recomputed independently
        long double abar_prev = 1, beta = 0;
        for (int i = 0; i <= t; i++) {
            beta = 1e-4L + (0.02L - 1e-4L) * i / (T - 1);
            if (i < t) abar_prev *= 1 - beta;
        }
        long double alpha = 1 - beta;
        for (int b = 0; b < 3; b++)
            for (int c = 0; c < 3; c++) {
                float x0 = x0s[b], xt = xts[c], mean;
                double var, lv;
                q_posterior_mean_variance(&mean, &var, &lv, &x0, &xt, &t, 1, 1, &s);
                // Bayes: q(x_{t-1} | x_t, x_0) is proportional to
                //   q(x_{t-1} | x_0) = N(sqrt(abar_{t-1}) x_0, 1 - abar_{t-1})        (Eq. 4)
                //   times q(x_t | x_{t-1}) = N(x_t; sqrt(alpha_t) x_{t-1}, beta_t)    (Eq. 2),
                // a Gaussian in x_{t-1} with precision alpha_t / beta_t and mean x_t / sqrt(alpha_t).
                // The product has precision 1/v_prior + alpha/beta and a precision-weighted mean.
                // At t = 1 the prior is a point mass at x_0 (abar_0 = 1).
                long double m_ref, v_ref;
                if (t == 0) { m_ref = x0; v_ref = 0; }
                else {
                    long double vp = 1 - abar_prev, mp = sqrtl(abar_prev) * x0;
                    long double prec = 1 / vp + alpha / beta;
                    m_ref = (mp / vp + sqrtl(alpha) * xt / beta) / prec;
                    v_ref = 1 / prec;
                }
                // mean: two float products and a sum with coefficients in [0, 1] rounded to
                // float: a few ulps of |x_0| + |x_t|; 1e-6 (u = 6e-8) leaves a margin.
                e_mean = fmax(e_mean, fabsl(mean - m_ref) / (1e-6 * (fabs(x0) + fabs(xt))));
                e_var = fmax(e_var, t == 0 ? fabs(var) : rel_err(var, v_ref));
                if (t > 0) e_lv = fmax(e_lv, fabsl(lv - logl(v_ref)));
                else e_lv = fmax(e_lv, fabs(lv - log(s.posterior_variance[1])));
            }
    }
    check("posterior mean (Eq. 7) = Bayes product of Gaussians", e_mean <= 1,
          "worst |diff| / (1e-6 (|x_0| + |x_t|)) = %.3f (pass <= 1); 5 t x 3 x_0 x 3 x_t", e_mean);
    // variance: double arithmetic on 1 - alpha_bar, as in the schedule test: 1e-10
    check("posterior variance (Eq. 7) = Bayes product of Gaussians", e_var < 1e-10 && e_lv < 1e-10,
          "max rel err var %.2g, max abs err log var %.2g (tol 1e-10)", e_var, e_lv);
    schedule_free(&s);
}

static void test_reverse_process(void) {
    const int T = 1000, B = 4, n = 1000;
    Schedule s;
    schedule_init(&s, T, SCHEDULE_LINEAR);
    int t_idx[4] = {0, 100, 500, 999};
    float* x0 = fmalloc(B * n);
    for (int i = 0; i < B * n; i++) x0[i] = (float)(2 * rng_uniform(&trng) - 1);
    float* eps = randn(B * n, 1);
    float* xt = fmalloc(B * n);
    float* x0_hat = fmalloc(B * n);
    q_sample(xt, x0, eps, t_idx, B, n, &s);
    predict_x0_from_eps(x0_hat, xt, eps, t_idx, B, n, &s);
    // Error bound: x_t carries ~3u(|x_0| + |eps|) of rounding (float coefficients <= 1);
    // x0_hat multiplies it by sqrt(1/abar_t) (up to 157 at t = T) and adds ~3u of its own
    // products: <= ~6u sqrt(1/abar)(|x_0| + 2|eps|). Pass if within 8u of that scale.
    double worst = 0;
    for (int b = 0; b < B; b++)
        for (int i = b * n; i < (b + 1) * n; i++) {
            double tol = 8 * U_F32 * s.sqrt_recip_alphas_cumprod[t_idx[b]] * (fabs(x0[i]) + 2 * fabs(eps[i]));
            worst = fmax(worst, fabs(x0_hat[i] - x0[i]) / tol);
        }
    check("predict_x0_from_eps inverts q_sample (Eq. 15)", worst <= 1,
          "worst |x0_hat - x_0| / (8u sqrt(1/abar)(|x_0| + 2|eps|)) = %.3f (pass <= 1), t = 1, 101, 501, 1000", worst);

    // p_mean_variance without clipping = Eq. (11): 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - abar_t) eps)
    float* eps_theta = randn(B * n, 1);
    float* mean = fmalloc(B * n);
    float* log_var = fmalloc(B * n);
    p_mean_variance(mean, log_var, x0_hat, xt, eps_theta, t_idx, B, n, MEAN_EPS, VAR_FIXEDLARGE, 0, &s);
    // The float path goes through x0_hat (error ~6u sqrt(1/abar)(|x_t| + |eps|)), then
    // multiplies it by coef1 <= beta/((1 - abar) sqrt(alpha)) * sqrt(abar), which cancels the
    // sqrt(1/abar): ~10u (|x_t| + |eps|) in all. Pass if within 16u of that scale.
    worst = 0;
    for (int b = 0; b < B; b++) {
        int t = t_idx[b];
        double beta = s.betas[t], alpha = 1 - beta, abar = s.alphas_cumprod[t];
        for (int i = b * n; i < (b + 1) * n; i++) {
            double mu = (xt[i] - beta / sqrt(1 - abar) * eps_theta[i]) / sqrt(alpha);
            double tol = 16 * U_F32 * (fabs(xt[i]) + fabs(eps_theta[i]));
            worst = fmax(worst, fabs(mean[i] - mu) / tol);
        }
    }
    check("p_mean_variance unclipped = Eq. (11)", worst <= 1,
          "worst |mean - mu| / (16u (|x_t| + |eps|)) = %.3f (pass <= 1)", worst);

    // with clip, x0_hat is the unclipped one clamped to [-1, 1]
    float* x0_clip = fmalloc(B * n);
    float* mean_clip = fmalloc(B * n);
    p_mean_variance(mean_clip, NULL, x0_clip, xt, eps_theta, t_idx, B, n, MEAN_EPS, VAR_FIXEDLARGE, 1, &s);
    int clip_ok = 1, n_clipped = 0;
    for (int i = 0; i < B * n; i++) {
        float want = x0_hat[i] > 1 ? 1.0f : x0_hat[i] < -1 ? -1.0f : x0_hat[i];
        clip_ok &= x0_clip[i] == want;
        n_clipped += x0_hat[i] != want;
    }
    check("p_mean_variance clip: x0_hat clamped to [-1, 1]", clip_ok && n_clipped > 0,
          "%d of %d values clipped, the rest unchanged", n_clipped, B * n);

    // sigma_t^2 = beta_t (with beta_tilde_2 at t = 1), or beta_tilde_t
    // (log_var holds it per pixel, in float)
    int lv_ok = fabs(p_log_variance(0, VAR_FIXEDLARGE, &s) - log(s.posterior_variance[1])) < 1e-12;
    for (int b = 1; b < B; b++) lv_ok &= fabs(p_log_variance(t_idx[b], VAR_FIXEDLARGE, &s) - log(s.betas[t_idx[b]])) < 1e-12;
    for (int b = 0; b < B; b++)
        for (int i = 0; i < n; i++) lv_ok &= log_var[b * n + i] == (float)p_log_variance(t_idx[b], VAR_FIXEDLARGE, &s);
    check("p_log_variance VAR_FIXEDLARGE", lv_ok, "t=1: %.6f = log beta_tilde_2 %.6f (not log beta_1 %.6f); t>1: log beta_t",
          log_var[0], log(s.posterior_variance[1]), log(s.betas[0]));
    int tl_ok = fabs(p_log_variance(0, VAR_FIXEDSMALL, &s) - log(s.posterior_variance[1])) < 1e-12;
    for (int t = 1; t < T; t += 37) tl_ok &= fabs(p_log_variance(t, VAR_FIXEDSMALL, &s) - log(s.posterior_variance[t])) < 1e-12;
    check("p_log_variance VAR_FIXEDSMALL", tl_ok, "log beta_tilde_t, beta_tilde_2 at t = 1");

    free(x0); free(eps); free(xt); free(x0_hat); free(eps_theta); free(mean); free(x0_clip); free(mean_clip);
    free(log_var);
    schedule_free(&s);
}

// ----------------------------------------------------------------------------
// 5-6. The bound and the loss

static long double log_normal_pdf(long double x, long double m, long double logvar) {
    long double d = x - m;
    return -0.5L * (logl(2 * acosl(-1.0L)) + logvar + d * d / expl(logvar));
}

static void test_normal_kl(void) {
    const double cases[5][4] = {
        {0, 0, 0, 0}, {0.5, log(0.3), -0.2, log(1.7)}, {1, log(2.0), 0, log(0.5)},
        {-0.3, log(1e-2), 0.1, log(1e-2)}, {0.2, log(4.0), 0.2, log(0.25)}};
    double worst = 0;
    char detail[256] = "";
    for (int c = 0; c < 5; c++) {
        double m1 = cases[c][0], lv1 = cases[c][1], m2 = cases[c][2], lv2 = cases[c][3];
        // Simpson's rule for the integral of p log(p/q) over m1 +- 14 sd of p
        const int n = 40000;
        long double sd = expl(0.5L * lv1), a = m1 - 14 * sd, h = 28 * sd / n, sum = 0;
        for (int i = 0; i <= n; i++) {
            long double x = a + i * h, lp = log_normal_pdf(x, m1, lv1), lq = log_normal_pdf(x, m2, lv2);
            long double f = expl(lp) * (lp - lq);
            sum += f * (i == 0 || i == n ? 1 : i % 2 ? 4 : 2);
        }
        double integral = (double)(sum * h / 3), kl = normal_kl(m1, lv1, m2, lv2);
        double err = fabs(kl - integral) / fmax(fabs(integral), 1e-6);
        worst = fmax(worst, err);
        size_t l = strlen(detail);
        snprintf(detail + l, sizeof detail - l, "%s%.6g", c ? ", " : "", kl);
    }
    // Simpson with h = 7e-4 sd has error ~h^4 ~ 1e-13; the tails beyond 14 sd hold < 1e-40.
    check("normal_kl vs numerical integration", worst < 1e-8, "max rel err %.2g (tol 1e-8); KLs %s", worst, detail);
}

static void test_discretized_decoder(void) {
    const double means[8] = {-1.2, -1, -0.37, 0, 0.5, 0.999, 1, 1.3};
    const double scales[5] = {1e-3, 0.02, 0.3, 1, 3};
    double worst_sum = 0, worst_bin = 0;
    for (int a = 0; a < 8; a++)
        for (int b = 0; b < 5; b++) {
            double mean = means[a], ls = log(scales[b]), total = 0;
            for (int k = 0; k < 256; k++) {
                double x = k / 127.5 - 1, ll = discretized_gaussian_log_likelihood(x, mean, ls, NULL, NULL);
                total += exp(ll);
                // the bin's Gaussian mass computed here, end bins extended to -+inf; each
                // CDF difference is taken in the tail away from the mean (no cancellation)
                long double r2 = scales[b] * sqrtl(2), lo = (x - 1.0L / 255 - mean) / r2, hi = (x + 1.0L / 255 - mean) / r2;
                long double p = k == 0 ? 0.5L * erfcl(-hi)                       // P(X < x + 1/255)
                              : k == 255 ? 0.5L * erfcl(lo)                      // P(X > x - 1/255)
                              : mean < x ? 0.5L * (erfcl(lo) - erfcl(hi))        // upper tails
                                         : 0.5L * (erfcl(-hi) - erfcl(-lo));     // lower tails
                if (p > 1e-6) worst_bin = fmax(worst_bin, fabsl(ll - logl(p)));
            }
            worst_sum = fmax(worst_sum, fabs(total - 1));
        }
    // Each of the 256 bins is floored at 1e-12 (<= 2.6e-10 extra mass in all), and the CDF
    // differences telescope to 1 up to double rounding (~256 x 1e-16): 1e-9.
    check("decoder (Eq. 13): 256 bin probabilities sum to 1", worst_sum < 1e-9,
          "max |sum - 1| %.2g (tol 1e-9) over 8 means x 5 scales", worst_sum);
    // bins with mass > 1e-6 are free of the floor and of cancellation (the code takes the
    // far tail): double erfc is good to a few ulps, so log p agrees to ~1e-10 relative.
    check("decoder (Eq. 13): bin masses vs erfc", worst_bin < 1e-8, "max |log p - log p_ref| %.2g (tol 1e-8)", worst_bin);
}

static void test_prior_bpd(void) {
    Schedule s;
    schedule_init(&s, 1000, SCHEDULE_LINEAR);
    const size_t n = 3 * 32 * 32;
    float* x = fmalloc(n);
    double lo = 1, hi = 0, worst = 0;
    for (int img = 0; img < 3; img++) {
        for (size_t i = 0; i < n; i++)
            x[i] = img == 0 ? (float)(2 * rng_uniform(&trng) - 1) : img == 1 ? (i % 2 ? 1.0f : -1.0f) : (float)(i % 256) / 127.5f - 1;
        double bpd = prior_bpd(x, n, &s);
        lo = fmin(lo, bpd); hi = fmax(hi, bpd);
        // the closed form, in long double: KL(N(sqrt(ab) x, 1 - ab) || N(0, 1)) per value
        long double ab = 1, kl = 0;
        for (int t = 0; t < 1000; t++) ab *= 1 - (1e-4L + (0.02L - 1e-4L) * t / 999);
        for (size_t i = 0; i < n; i++) kl += 0.5L * (-1 - logl(1 - ab) + (1 - ab) + ab * x[i] * x[i]);
        worst = fmax(worst, rel_err(bpd, kl / (n * logl(2))));
    }
    // §4: L_T = D_KL(q(x_T|x_0) || N(0, I)) ~ 1e-5 bits/dim; 1e-6 < L_T < 1e-4 for data in
    // [-1, 1] with a spread (a constant 0 image would give ~1e-9). The closed form agrees
    // to double rounding of 1 - abar and log(1 - abar): 1e-8.
    check("L_T for the linear schedule ~1e-5 bits/dim (§4)", lo > 1e-6 && hi < 1e-4 && worst < 1e-8,
          "prior_bpd %.3g .. %.3g bits/dim on 3 images; rel err vs closed form %.2g", lo, hi, worst);
    free(x);
    schedule_free(&s);
}

static void test_l_simple(void) {
    const size_t N = 37;
    float* e = randn(N, 1);
    float* eps = randn(N, 1);
    float* grad = fmalloc(N);
    double L = l_simple(grad, e, eps, N);
    double ref = 0;
    for (size_t i = 0; i < N; i++) ref += ((double)e[i] - eps[i]) * ((double)e[i] - eps[i]);
    ref /= N;
    // the mean is summed and returned in double: the same sum in the same order
    check("l_simple value (Eq. 14)", fabs(L - ref) <= 1e-15 * ref && l_simple(NULL, e, eps, N) == L,
          "%.12f vs %.12f (tol 1e-15 |L|)", L, ref);
    float* num = fmalloc(N);
    const float h = 1e-2f;
    for (size_t i = 0; i < N; i++) {
        float e0 = e[i];
        e[i] = e0 + h; float ep = e[i]; double Lp = l_simple(NULL, e, eps, N);
        e[i] = e0 - h; float em = e[i]; double Lm = l_simple(NULL, e, eps, N);
        e[i] = e0;
        num[i] = (float)((Lp - Lm) / ((double)ep - em));
    }
    // L is quadratic, so central differences are exact but for the float rounding of
    // L (u |L| ~ 1e-7) divided by 2h: ~1e-5, against gradients ~2/N ~ 0.05: 1e-3 relative.
    check_tensor("l_simple gradient vs finite differences", grad, num, N, 1e-3 * max_abs(num, N));
    free(e); free(eps); free(grad); free(num);
}

// ----------------------------------------------------------------------------
// 16, 17. Layers: backward vs central finite differences, fast kernels vs references
//
// Each layer is wrapped as an objective L = sum(out * R) for a fixed random R, summed in
// double. Then dL/dout = R, so backward(dout = R) must give dL/dinput and dL/dweights,
// which are compared to (L(x + h) - L(x - h)) / 2h for every coordinate (sizes are small).
// Central differences with h = 1e-2 on a float32 forward pass: the truncation error is
// h^2/6 |L'''| (zero for layers linear in the variable), and the rounding error is about
// u |out| sqrt(#outputs touched) |R| / h ~ 1e-5. Tolerances, relative to max |gradient|:
//   1e-3 for variables the layer is linear in (rounding only, 100x margin),
//   1e-2 for nonlinear ones (silu, GroupNorm, softmax: h^2 = 1e-4 times curvatures of O(10)).

#define FD_H 1e-2f
#define TOL_LINEAR 1e-3
#define TOL_NONLINEAR 1e-2

typedef struct {
    void (*forward)(void* ctx);   // recomputes *out from the current inputs and weights
    void* ctx;
    const float* out;
    size_t n_out;
    const float* R;
} FdProbe;

static double objective(const FdProbe* o) {
    o->forward(o->ctx);
    double L = 0;
    for (size_t i = 0; i < o->n_out; i++) L += (double)o->out[i] * o->R[i];
    return L;
}

// The differences run on one thread: they are hundreds of tiny forward passes, where
// starting a thread team costs more than the work (and far more on a loaded machine).
// The analytic backward and the forward-vs-naive checks run on every thread, and the
// U-Net tests show the bits do not depend on the thread count.
static void numeric_grad(float* g, float* x, size_t n, const FdProbe* o) {
    int threads = get_threads();
    set_threads(1);
    for (size_t i = 0; i < n; i++) {
        float x0 = x[i];
        x[i] = x0 + FD_H; float xp = x[i]; double Lp = objective(o);
        x[i] = x0 - FD_H; float xm = x[i]; double Lm = objective(o);
        x[i] = x0;
        g[i] = (float)((Lp - Lm) / ((double)xp - xm));   // the step actually taken in float
    }
    set_threads(threads);
    o->forward(o->ctx);   // leave the outputs (and saved statistics) at x
}

// Analytic gradient `ana` of variable x (n values) against central differences.
static void check_grad(const char* name, const float* ana, float* x, size_t n, const FdProbe* o, double rel) {
    float* num = fmalloc(n);
    numeric_grad(num, x, n, o);
    check_tensor(name, ana, num, n, rel * max_abs(num, n));
    free(num);
}

// ---- convolution ----
// The checks below run the layers as the network calls them (12.1): the fast kernels
// of Part III, or, in a -DDDPM_PLAIN build, the references of section 16. Finite
// differences check either one's backward against its own forward; the fast-vs-reference
// checks (#ifndef DDPM_PLAIN) then tie the kernels to the references, which
// tests/reference.py ties to PyTorch.
typedef struct { float *x, *w, *b, *out, *col; int B, C_in, H, W, C_out, K, stride; } ConvCase;

static void conv_fwd(void* p) {
    ConvCase* c = p;
    conv2d_forward(c->out, c->x, c->w, c->b, c->B, c->C_in, c->H, c->W, c->C_out, c->K, c->stride, c->col);
}

static float* fabs_copy(const float* x, size_t n) {
    float* y = fmalloc(n);
    for (size_t i = 0; i < n; i++) y[i] = fabsf(x[i]);
    return y;
}

static void test_conv(int K, int stride, int accumulation_check) {
    ConvCase c = {0};
    c.B = 2; c.C_in = 3; c.H = 6; c.W = 6; c.C_out = 4; c.K = K; c.stride = stride;
    int Ho = c.H / stride, Wo = c.W / stride;
    size_t nx = (size_t)c.B * c.C_in * c.H * c.W, nw = (size_t)c.C_out * c.C_in * K * K, no = (size_t)c.B * c.C_out * Ho * Wo;
    c.x = randn(nx, 1); c.w = randn(nw, 0.5f); c.b = randn(c.C_out, 0.1f);
    c.out = fmalloc(no);
    layers_init();
    c.col = fmalloc(conv2d_workspace_floats(c.B, c.C_in, c.H, c.W, c.C_out, K, stride, kernel_threads));
    float* R = randn(no, 1);
    FdProbe o = {conv_fwd, &c, c.out, no, R};
    char name[96], what[48];
    snprintf(what, sizeof what, "conv2d %dx%d stride %d", K, K, stride);
    conv_fwd(&c);
    float* dx = fmalloc(nx);
    float* dw = fmalloc(nw);
    float* db = fmalloc(c.C_out);
    conv2d_backward(dx, dw, db, R, c.x, c.w, c.B, c.C_in, c.H, c.W, c.C_out, K, stride, c.col);
    snprintf(name, sizeof name, "%s d input", what);
    check_grad(name, dx, c.x, nx, &o, TOL_LINEAR);
    snprintf(name, sizeof name, "%s d weight", what);
    check_grad(name, dw, c.w, nw, &o, TOL_LINEAR);
    snprintf(name, sizeof name, "%s d bias", what);
    check_grad(name, db, c.b, c.C_out, &o, TOL_LINEAR);

    if (accumulation_check) {
        // The contract of every backward function: it adds (+=) into dinp and the weight
        // gradients. A second call must double them, up to the rounding of re-adding the
        // same terms onto a nonzero start (at most K^2 = 9 additions at magnitude 2|g|:
        // ~1e-6 of max|g|; tol 1e-5).
        float* dx1 = fcopy(dx, nx);
        float* dw1 = fcopy(dw, nw);
        float* db1 = fcopy(db, c.C_out);
        conv2d_backward(dx, dw, db, R, c.x, c.w, c.B, c.C_in, c.H, c.W, c.C_out, K, stride, c.col);
        for (size_t i = 0; i < nx; i++) dx1[i] *= 2;
        for (size_t i = 0; i < nw; i++) dw1[i] *= 2;
        for (int i = 0; i < c.C_out; i++) db1[i] *= 2;
        double e = fmax(max_abs_diff(dx, dx1, nx) / max_abs(dx1, nx),
                        fmax(max_abs_diff(dw, dw1, nw) / max_abs(dw1, nw), max_abs_diff(db, db1, c.C_out) / max_abs(db1, c.C_out)));
        check("backward accumulates (+=): conv2d called twice doubles dinp, dweight, dbias", e < 1e-5,
              "max rel diff from 2x %.2g (tol 1e-5)", e);
        free(dx1); free(dw1); free(db1);
    }
    free(c.x); free(c.w); free(c.b); free(c.out); free(c.col); free(R); free(dx); free(dw); free(db);
}

#ifndef DDPM_PLAIN
// A layer's reference (ddpm.c section 16) in the binary where the layer itself hands its
// work to the kernel of Part III: REF(conv2d_forward, args...) runs the plain loops.
#define REF(layer, ...) (fast_layers = 0, layer(__VA_ARGS__), fast_layers = 1)
static size_t ref_size;
#define REF_SIZE(layer, ...) (fast_layers = 0, ref_size = layer(__VA_ARGS__), fast_layers = 1, ref_size)

// e[k] = max |got[k] - want[k]| / max |want[k]| for the four tensors of a layer's check
// (output, and three gradients); returns the worst.
static double rel_errors4(double e[4], float* const got[4], float* const want[4], const size_t n[4]) {
    double worst = 0;
    for (int k = 0; k < 4; k++) {
        e[k] = max_abs_diff(got[k], want[k], n[k]) / max_abs(want[k], n[k]);
        worst = fmax(worst, e[k]);
    }
    return worst;
}

// got against the reference's want, relative to `scale` (a sum of |terms| of the sums
// both compute, so float rounding of any order stays below ~n u of it).
static double rel_diff(const float* got, const float* want, size_t n, double scale) {
    return max_abs_diff(got, want, n) / fmax(scale, 1e-30);
}

// The tiled kernels (17.2) against the reference conv2d_forward / conv2d_backward, on shapes
// that exercise every edge: C_out not a multiple of the tiles' channel counts, C_in x
// taps not a multiple of 9, W not a multiple of the vector width, pixel tiles that
// straddle rows and the image's end, stride 2. The scales are the same loops run on
// |x|, |w|, |dy|: sum |terms| of every output. The conv runs as wino_force says (-1:
// direct; 2, 4: Winograd's tile on every shape); e gets the four errors, the worst returned.
static double conv_vs_ref(double e[4], int force, int K, int stride, int B, int C_in, int C_out, int H, int W) {
    int Ho = H / stride, Wo = W / stride;
    size_t nx = (size_t)B * C_in * H * W, nw = (size_t)C_out * C_in * K * K, no = (size_t)B * C_out * Ho * Wo;
    float *x = randn(nx, 1), *w = randn(nw, 0.3f), *b = randn(C_out, 0.1f), *dy = randn(no, 1);
    float *ax = fabs_copy(x, nx), *aw = fabs_copy(w, nw), *ab = fabs_copy(b, C_out), *ady = fabs_copy(dy, no);
    layers_init();
    wino_force = force;
    float* ws = fmalloc(conv2d_workspace_floats_fast(B, C_in, H, W, C_out, K, stride, kernel_threads));
    float *y = fmalloc(no), *yr = fmalloc(no), *ya = fmalloc(no);
    float *dx = fmalloc(nx), *dxr = fmalloc(nx), *dxa = fmalloc(nx);
    float *dw = fmalloc(nw), *dwr = fmalloc(nw), *dwa = fmalloc(nw);
    float *db = fmalloc(C_out), *dbr = fmalloc(C_out), *dba = fmalloc(C_out);
    conv2d_forward_fast(y, x, w, b, B, C_in, H, W, C_out, K, stride, ws);
    conv2d_backward_fast(dx, dw, db, dy, x, w, B, C_in, H, W, C_out, K, stride, ws);
    wino_force = 0;
    REF(conv2d_forward, yr, x, w, b, B, C_in, H, W, C_out, K, stride, NULL);
    REF(conv2d_backward, dxr, dwr, dbr, dy, x, w, B, C_in, H, W, C_out, K, stride, NULL);
    REF(conv2d_forward, ya, ax, aw, ab, B, C_in, H, W, C_out, K, stride, NULL);
    REF(conv2d_backward, dxa, dwa, dba, ady, ax, aw, B, C_in, H, W, C_out, K, stride, NULL);
    e[0] = rel_diff(y, yr, no, max_abs(ya, no)), e[1] = rel_diff(dx, dxr, nx, max_abs(dxa, nx));
    e[2] = rel_diff(dw, dwr, nw, max_abs(dwa, nw)), e[3] = rel_diff(db, dbr, C_out, max_abs(dba, C_out));
    free(x); free(w); free(b); free(dy); free(ax); free(aw); free(ab); free(ady); free(ws);
    free(y); free(yr); free(ya); free(dx); free(dxr); free(dxa); free(dw); free(dwr); free(dwa);
    free(db); free(dbr); free(dba);
    return fmax(fmax(e[0], e[1]), fmax(e[2], e[3]));
}

static double direct_worst;   // the direct 3x3 stride-1 conv's largest error, forward and d input
static void test_conv_vs_ref(int K, int stride, int B, int C_in, int C_out, int H, int W) {
    double e[4], worst = conv_vs_ref(e, -1, K, stride, B, C_in, C_out, H, W);
    if (K == 3 && stride == 1) direct_worst = fmax(direct_worst, fmax(e[0], e[1]));
    // float sums of n terms: |error| <= n u sum|terms| (u = 6e-8); n <= B H W here
    check("conv2d fast kernels vs reference (forward, d input, d weight, d bias)", worst < 1e-5,
          "%dx%d stride %d, B %d, C_in %d, C_out %d, %dx%d: relative errors %.2g %.2g %.2g %.2g (tol 1e-5)",
          K, K, stride, B, C_in, C_out, H, W, e[0], e[1], e[2], e[3]);
}

// Winograd's F(m x m, 3 x 3) (17.2.1), forward, input and weight gradients, against the
// reference. Each output is sum_xi A^T[.][xi] (sum_c U V) A[xi][.], whose |terms| add up to
// at most kappa^2 times the direct conv's sum |terms|, kappa = max_i sum_k |A^T_ik| (|G| 1)_k
// (|B^T| 1)_k / 3 from the 1-D transforms: 16 for F(4x4), 8/3 for F(2x2). That bounds the
// worst case; rounding errors of random sign add in quadrature, so on random data the
// growth is about kappa: the direct conv's tolerance times kappa (1.6e-4, 2.7e-5). The
// weight gradient, G^T (sum over tiles V (A dY A^T)) G, has the same transforms, transposed.
static double wino_worst[5], wino_dw_worst[5];   // forward and d input; d weight
static void test_wino_vs_ref(int m, int B, int C_in, int C_out, int H, int W) {
    double e[4], tol = m == 4 ? 16 * 1e-5 : 8 / 3.0 * 1e-5;
    conv_vs_ref(e, m, 3, 1, B, C_in, C_out, H, W);
    wino_worst[m] = fmax(wino_worst[m], fmax(e[0], e[1]));
    wino_dw_worst[m] = fmax(wino_dw_worst[m], e[2]);
    check("conv2d 3x3 by Winograd vs reference (forward, d input, d weight; d bias direct)",
          fmax(fmax(e[0], e[1]), e[2]) < tol && e[3] < 1e-5,
          "F(%dx%d, 3x3), B %d, C_in %d, C_out %d, %dx%d: relative errors %.2g %.2g %.2g %.2g (tol %.2g, 1e-5)",
          m, m, B, C_in, C_out, H, W, e[0], e[1], e[2], e[3], tol);
}

// conv2d runs on parallel threads (work items of one tile of pixels of one image;
// weight-gradient tiles owned by one thread each; for the stride-2 input gradient,
// whole images with their own col2im slices); the result must have the same bits as on
// one thread, every time. The thread count is set as --threads sets it (layers_reinit).
// A race shows only when two threads work at the same moment, so the call is made
// ~10 ms, longer than a scheduler time slice: the threads overlap even when they share
// a core on a loaded machine. Repeated until a difference, at most 8 times.
static void test_conv_threads(int K, int stride) {
    const int B = 2, C = 64, H = 32, reps = 8, Ho = H / stride;
    size_t nx = (size_t)B * C * H * H, ny = (size_t)B * C * Ho * Ho, nw = (size_t)C * C * K * K;
    int threads = get_threads(), many = threads > 1 ? threads : 2;
    float* x = randn(nx, 1);
    float* w = randn(nw, 0.1f);
    float* b = randn(C, 0.1f);
    float* dy = randn(ny, 1);
    float* ws = fmalloc(conv2d_workspace_floats(B, C, H, H, C, K, stride, many));
    float *y1 = fmalloc(ny), *y2 = fmalloc(ny), *dx1 = fmalloc(nx), *dx2 = fmalloc(nx);
    float *dw1 = fmalloc(nw), *dw2 = fmalloc(nw), *db1 = fmalloc(C), *db2 = fmalloc(C);
    int bad_fwd = 0, bad_bwd = 0;
    layers_reinit(1);
    conv2d_forward(y1, x, w, b, B, C, H, H, C, K, stride, ws);
    conv2d_backward(dx1, dw1, db1, dy, x, w, B, C, H, H, C, K, stride, ws);
    layers_reinit(many);
    int r = 0;
    for (; r < reps && !bad_fwd && !bad_bwd; r++) {
        memset(dx2, 0, nx * sizeof(float));
        memset(dw2, 0, nw * sizeof(float));
        memset(db2, 0, C * sizeof(float));
        conv2d_forward(y2, x, w, b, B, C, H, H, C, K, stride, ws);
        conv2d_backward(dx2, dw2, db2, dy, x, w, B, C, H, H, C, K, stride, ws);
        bad_fwd += memcmp(y1, y2, ny * sizeof(float)) != 0;
        bad_bwd += memcmp(dx1, dx2, nx * sizeof(float)) != 0 || memcmp(dw1, dw2, nw * sizeof(float)) != 0 ||
                   memcmp(db1, db2, C * sizeof(float)) != 0;
    }
    layers_reinit(threads);
    check("conv2d forward and backward: same bits on 1 thread and on several", !bad_fwd && !bad_bwd,
          "%dx%d stride %d, %d runs on %d threads, forward differs %d, backward differs %d (max |diff| %.3g)",
          K, K, stride, r, many, bad_fwd, bad_bwd, fmax(max_abs_diff(y1, y2, ny), max_abs_diff(dw1, dw2, nw)));
    free(x); free(w); free(b); free(dy); free(ws); free(y1); free(y2);
    free(dx1); free(dx2); free(dw1); free(dw2); free(db1); free(db2);
}

// The conv-input seam of 12.1: GroupNorm+SiLU written as padded grids, dropout on the
// grids, the 3x3 conv reading them, and its input gradient, against the references on
// the plain layout. Also: nothing is written to a grid's border and slack, which the
// conv reads as the zero padding.
static void test_conv_input_vs_ref(int B, int C, int C_out, int H, int W, int G) {
    size_t nx = (size_t)B * C * H * W, ng = (size_t)B * C * conv_input_floats_fast(H, W), no = (size_t)B * C_out * H * W;
    size_t nw = (size_t)C_out * C * 9, P = conv_input_floats_fast(H, W);
    int Wp = conv_geom(H, W, 3, 1).Wp;
    float *x = randn(nx, 1.3f), *gamma = randn(C, 0.3f), *beta = randn(C, 0.2f), *w = randn(nw, 0.3f), *b = randn(C_out, 0.1f);
    float *dy = randn(no, 1), *grid = fmalloc(ng), *a = fmalloc(nx), *back = fmalloc(nx);
    float *m1 = fmalloc(B * G), *r1 = fmalloc(B * G), *m2 = fmalloc(B * G), *r2 = fmalloc(B * G);
    float *y = fmalloc(no), *yr = fmalloc(no), *da = fmalloc(nx), *dar = fmalloc(nx);
    float *dw = fmalloc(nw), *dwr = fmalloc(nw), *db = fmalloc(C_out), *dbr = fmalloc(C_out);
    layers_init();
    float* ws = fmalloc(conv2d_workspace_floats_fast(B, C, H, W, C_out, 3, 1, kernel_threads));
    for (size_t i = 0; i < ng; i++) grid[i] = 0;
    groupnorm_silu_conv_input_fast(grid, m1, r1, x, gamma, beta, B, C, H, W, G);
    REF(groupnorm_forward, a, m2, r2, x, gamma, beta, B, C, H * W, G, 1);   // section 14's reference unit
    dropout_conv_input_fast(grid, B, C, H, W, 0.3f, 77);
    dropout_forward(a, a, nx, 0.3f, 77);
    int bad_border = 0;
    for (int bc = 0; bc < B * C; bc++)
        for (size_t j = 0; j < P; j++) {
            size_t h = j / Wp, v = j % Wp;
            float g = grid[bc * P + j];
            if (h >= 1 && h <= (size_t)H && v >= 1 && v <= (size_t)W) back[(size_t)bc * H * W + (h - 1) * W + v - 1] = g;
            else bad_border += g != 0;
        }
    double e_gn = max_abs_diff(back, a, nx) / max_abs(a, nx);
    conv3x3_forward_fast(y, grid, w, b, B, C, H, W, C_out, ws);
    REF(conv2d_forward, yr, a, w, b, B, C, H, W, C_out, 3, 1, NULL);
    conv3x3_backward_fast(da, dw, db, dy, grid, w, B, C, H, W, C_out, ws);
    REF(conv2d_backward, dar, dwr, dbr, dy, a, w, B, C, H, W, C_out, 3, 1, NULL);
    double e[4];
    double worst = rel_errors4(e, (float* [4]){y, da, dw, db}, (float* [4]){yr, dar, dwr, dbr},
                               (size_t[4]){no, nx, nw, (size_t)C_out});
    // GroupNorm: float lanes and exp_approx against double sums and expf: ~1e-6 of max |a|.
    // The conv terms are O(1) with random signs: errors of a few u sqrt(n) times max |result|.
    check("groupnorm+silu into conv grids, dropout on grids vs reference on plain tensors",
          e_gn < 1e-5 && bad_border == 0, "B %d, C %d, %dx%d, G %d: relative error %.2g (tol 1e-5), %d nonzero border values",
          B, C, H, W, G, e_gn, bad_border);
    check("conv3x3 on kept grids vs reference on plain tensors (forward, d input, d weight, d bias)", worst < 1e-5,
          "B %d, C_in %d, C_out %d, %dx%d: relative errors %.2g %.2g %.2g %.2g (tol 1e-5)",
          B, C, C_out, H, W, e[0], e[1], e[2], e[3]);
    free(x); free(gamma); free(beta); free(w); free(b); free(dy); free(grid); free(a); free(back);
    free(m1); free(r1); free(m2); free(r2); free(y); free(yr); free(da); free(dar); free(dw); free(dwr);
    free(db); free(dbr); free(ws);
}
#endif

// ---- GroupNorm (+ SiLU) ----
typedef struct { float *x, *gamma, *beta, *out, *mean, *rstd; int B, C, HW, G, silu; } GnCase;

static void gn_fwd(void* p) {
    GnCase* g = p;
    groupnorm_forward(g->out, g->mean, g->rstd, g->x, g->gamma, g->beta, g->B, g->C, g->HW, g->G, g->silu);
}

static void test_groupnorm(void) {
    GnCase g = {0};
    g.B = 2; g.C = 6; g.HW = 16; g.G = 3;
    size_t n = (size_t)g.B * g.C * g.HW;
    g.x = randn(n, 1.5f);
    for (size_t i = 0; i < n; i++) g.x[i] += 0.5f;
    g.gamma = randn(g.C, 0.3f);
    for (int c = 0; c < g.C; c++) g.gamma[c] += 1;
    g.beta = randn(g.C, 0.2f);
    g.out = fmalloc(n); g.mean = fmalloc(g.B * g.G); g.rstd = fmalloc(g.B * g.G);
    float* R = randn(n, 1);
    FdProbe o = {gn_fwd, &g, g.out, n, R};
    for (int silu = 0; silu <= 1; silu++) {
        g.silu = silu;
        gn_fwd(&g);
        float* dx = fmalloc(n);
        float* dgamma = fmalloc(g.C);
        float* dbeta = fmalloc(g.C);
        groupnorm_backward(dx, dgamma, dbeta, R, g.x, g.gamma, g.beta, g.mean, g.rstd, g.B, g.C, g.HW, g.G, silu);
        char name[96];
        snprintf(name, sizeof name, "groupnorm silu=%d d input", silu);
        check_grad(name, dx, g.x, n, &o, TOL_NONLINEAR);
        snprintf(name, sizeof name, "groupnorm silu=%d d gamma", silu);
        check_grad(name, dgamma, g.gamma, g.C, &o, silu ? TOL_NONLINEAR : TOL_LINEAR);
        snprintf(name, sizeof name, "groupnorm silu=%d d beta", silu);
        check_grad(name, dbeta, g.beta, g.C, &o, silu ? TOL_NONLINEAR : TOL_LINEAR);
        free(dx); free(dgamma); free(dbeta);
    }
    free(g.x); free(g.gamma); free(g.beta); free(g.out); free(g.mean); free(g.rstd); free(R);
}

#ifndef DDPM_PLAIN
// The fast GroupNorm(+SiLU) against the reference, forward and backward, on a group
// that fits GN_KEEP (dn kept between the passes) and on one that does not (dn
// recomputed): both paths of groupnorm_backward_fast. The inputs have |mean| >> std,
// where a one-pass variance would lose its digits.
static void test_groupnorm_vs_ref(void) {
    for (int big = 0; big <= 1; big++)
        for (int silu = 0; silu <= 1; silu++) {
            int B = 2, C = 4, G = 2, HW = big ? GN_KEEP / 2 + 64 : 96;   // big: C/G HW > GN_KEEP
            size_t n = (size_t)B * C * HW;
            float *x = randn(n, 1.2f), *gamma = randn(C, 0.3f), *beta = randn(C, 0.2f), *dy = randn(n, 1);
            for (size_t i = 0; i < n; i++) x[i] += 20.0f;
            float *y = fmalloc(n), *yr = fmalloc(n), *mean = fmalloc(B * G), *rstd = fmalloc(B * G);
            float *mr = fmalloc(B * G), *rr = fmalloc(B * G), *dx = fmalloc(n), *dxr = fmalloc(n);
            float *dg = fmalloc(C), *dgr = fmalloc(C), *dbt = fmalloc(C), *dbr = fmalloc(C);
            groupnorm_forward_fast(y, mean, rstd, x, gamma, beta, B, C, HW, G, silu);
            REF(groupnorm_forward, yr, mr, rr, x, gamma, beta, B, C, HW, G, silu);
            groupnorm_backward_fast(dx, dg, dbt, dy, x, gamma, beta, mean, rstd, B, C, HW, G, silu);
            REF(groupnorm_backward, dxr, dgr, dbr, dy, x, gamma, beta, mr, rr, B, C, HW, G, silu);
            double e[4];
            double worst = rel_errors4(e, (float* [4]){y, dx, dg, dbt}, (float* [4]){yr, dxr, dgr, dbr},
                                       (size_t[4]){n, n, (size_t)C, (size_t)C});
            char name[128];
            snprintf(name, sizeof name, "groupnorm%s fast vs reference, %s", silu ? "+silu" : "",
                     big ? "group too big to keep dn" : "dn kept between passes");
            // float lane sums of up to 16K values, exp_approx and a float rstd: ~1e-6 relative
            check(name, worst < 1e-5, "C/G HW %d (GN_KEEP %d): relative errors out %.2g, d input %.2g, "
                  "d gamma %.2g, d beta %.2g (tol 1e-5)", C / G * HW, GN_KEEP, e[0], e[1], e[2], e[3]);
            free(x); free(gamma); free(beta); free(dy); free(y); free(yr); free(mean); free(rstd);
            free(mr); free(rr); free(dx); free(dxr); free(dg); free(dgr); free(dbt); free(dbr);
        }
}

// exp_approx (17.3) against libm's exp in double, over the range it serves, plus its
// edges: clamped at -87 and 88 (where expf would under/overflow), NaN in, NaN out.
static void test_exp_approx(void) {
    double worst = 0, at = 0;
    for (int i = 0; i <= 400000; i++) {
        float x = -87.0f + 175.0f * (float)i / 400000.0f;
        double rel = fabs(exp_approx(x) - exp((double)x)) / exp((double)x);
        if (rel > worst) { worst = rel; at = x; }
    }
    check("exp_approx vs exp on [-87, 88]", worst < 2e-7, "max relative error %.2g at x = %.4g (tol 2e-7, float eps 1.2e-7)", worst, at);
    int edges = exp_approx(-200.0f) == exp_approx(-87.0f) && exp_approx(200.0f) == exp_approx(88.0f) &&
                isnan(exp_approx(NAN)) && isfinite(exp_approx(88.0f)) && exp_approx(-87.0f) > 0;
    check("exp_approx: clamps outside [-87, 88], keeps NaN", edges, "exp(-200) -> exp(-87), exp(200) -> exp(88), NaN stays");
}
#endif

// Denormals (17.0): the fast build flushes them in every OpenMP thread, so that inputs
// that used to make them (a SiLU or softmax input far below -87, a near-constant
// GroupNorm group, a tiny gradient squared in Adam) give none, and still agree with the
// reference layers, which keep gradual underflow.
#ifndef DDPM_PLAIN
static int count_denormals(const float* x, size_t n) {
    int k = 0;
    for (size_t i = 0; i < n; i++) k += fpclassify(x[i]) == FP_SUBNORMAL;
    return k;
}

static void test_denormals(void) {
#if DDPM_FLUSH_DENORMALS && defined(_OPENMP)
    int threads = 0, flushed = 0;
    omp_set_num_threads(4);
    #pragma omp parallel reduction(+ : threads, flushed)
    {
        threads++;
#if defined(__SSE2__)
        flushed += (__builtin_ia32_stmxcsr() & 0x8040) == 0x8040;
#else
        uint64_t fpcr;
        __asm__ volatile("mrs %0, fpcr" : "=r"(fpcr));
        flushed += (fpcr >> 24) & 1;
#endif
    }
    omp_set_num_threads(kernel_threads);
    check("every OpenMP thread flushes denormals (FTZ + DAZ, or FZ)", threads == 4 && flushed == 4,
          "%d of %d threads", flushed, threads);
    volatile float tiny = 1e-30f;
    check("a product below 2^-126 is flushed to 0", tiny * 1e-10f == 0.0f, "1e-30 * 1e-10 = %g", tiny * 1e-10f);
#endif
    // SiLU at and far below -87, where sigmoid's 1 / (1 + e^-x) falls under 2^-126
    enum { N = 256 };
    float *x = fmalloc(N), *y = fmalloc(N), *yr = fmalloc(N), *dy = fmalloc(N), *dx = fmalloc(N), *dxr = fmalloc(N);
    for (int i = 0; i < N; i++) x[i] = -80.0f - 0.2f * i, dy[i] = 1e-3f;   // -80 ... -131
    silu_forward_fast(y, x, N);
    REF(silu_forward, yr, x, N);
    silu_backward_fast(dx, dy, x, N);
    REF(silu_backward, dxr, dy, x, N);
    double e = fmax(max_abs_diff(y, yr, N), max_abs_diff(dx, dxr, N));
    int fin = all_finite(y, N) && all_finite(dx, N);
    check("silu on [-131, -80]: finite, no denormal, the reference's within 1e-30",
          fin && e < 1e-30 && (!DDPM_FLUSH_DENORMALS || count_denormals(y, N) + count_denormals(dx, N) == 0),
          "finite %d, max |diff| %.2g, denormals %d", fin, e, count_denormals(y, N) + count_denormals(dx, N));
    // GroupNorm + SiLU whose outputs lie below -87 (beta -100), and a group of 1e-21-sized
    // deviations, whose squares are denormals in the variance
    int B = 1, C = 4, G = 2, HW = 64;
    size_t n = (size_t)B * C * HW;
    float *gx = randn(n, 1), *gamma = randn(C, 0.3f), *beta = fmalloc(C), *gy = fmalloc(n), *gyr = fmalloc(n);
    float *m = fmalloc(B * G), *r = fmalloc(B * G), *mr = fmalloc(B * G), *rr = fmalloc(B * G);
    for (int c = 0; c < C; c++) beta[c] = -100.0f;
    for (size_t i = n / 2; i < n; i++) gx[i] *= 1e-21f;
    groupnorm_forward_fast(gy, m, r, gx, gamma, beta, B, C, HW, G, 1);
    REF(groupnorm_forward, gyr, mr, rr, gx, gamma, beta, B, C, HW, G, 1);
    e = max_abs_diff(gy, gyr, n);
    fin = all_finite(gy, n) && all_finite(r, B * G);
    check("groupnorm+silu below -87 and on a near-constant group: finite, no denormal, the reference's within 1e-30",
          fin && e < 1e-30 && (!DDPM_FLUSH_DENORMALS || count_denormals(gy, n) == 0),
          "finite %d, max |diff| %.2g, denormals %d", fin, e, count_denormals(gy, n));
    // attention with scores thousands apart: most of each softmax column is e^-87 or less
    int Ca = 8, Na = 40;
    size_t na = (size_t)Ca * Na;
    float *q = randn(na, 30), *k = randn(na, 30), *v = randn(na, 1), *o = fmalloc(na), *orf = fmalloc(na);
    float *at = fmalloc((size_t)Na * Na), *atr = fmalloc((size_t)Na * Na), *scr = fmalloc((size_t)kernel_threads * Na * Na);
    attention_forward_fast(o, at, q, k, v, 1, Ca, Na, scr);
    REF(attention_forward, orf, atr, q, k, v, 1, Ca, Na, scr);
    double ea = max_abs_diff(o, orf, na) / max_abs(orf, na);
    fin = all_finite(o, na) && all_finite(at, (size_t)Na * Na);
    check("attention with scores far apart: finite, no denormal weights, the reference's within 1e-5",
          fin && ea < 1e-5 && (!DDPM_FLUSH_DENORMALS || count_denormals(at, (size_t)Na * Na) == 0),
          "finite %d, relative error %.2g, denormal weights %d", fin, ea, count_denormals(at, (size_t)Na * Na));
    // Adam on a gradient of 1e-25: its square, 1e-50 (times 1 - beta2), is below even a denormal
    float p[4] = {1, 1, 1, 1}, g[4] = {1e-25f, -1e-22f, 3e-20f, 1e-19f}, am[4] = {0}, av[4] = {0};
    for (int t = 1; t <= 3; t++) adam_update(p, g, am, av, 4, 2e-4f, 0.9f, 0.999f, 1e-8f, t, 1.0f);
    check("Adam on gradients of 1e-25 to 1e-19: finite moments, no denormal",
          all_finite(p, 4) && all_finite(av, 4) && (!DDPM_FLUSH_DENORMALS || count_denormals(av, 4) + count_denormals(am, 4) == 0),
          "v = %g %g %g %g", av[0], av[1], av[2], av[3]);
    free(x); free(y); free(yr); free(dy); free(dx); free(dxr); free(gx); free(gamma); free(beta); free(gy); free(gyr);
    free(m); free(r); free(mr); free(rr); free(q); free(k); free(v); free(o); free(orf); free(at); free(atr); free(scr);
}
#endif

// ---- SiLU ----
typedef struct { float *x, *out; size_t n; } SiluCase;
static void silu_fwd(void* p) { SiluCase* s = p; silu_forward(s->out, s->x, s->n); }

static void test_silu(void) {
    SiluCase s = {randn(64, 3), fmalloc(64), 64};
    float* R = randn(64, 1);
    FdProbe o = {silu_fwd, &s, s.out, 64, R};
    silu_fwd(&s);
    double e = 0;
    for (int i = 0; i < 64; i++) e = fmax(e, fabs(s.out[i] - s.x[i] / (1 + exp(-(double)s.x[i]))));
    float* dx = fmalloc(64);
    silu_backward(dx, R, s.x, 64);
    // values up to ~9 through an exp and a division: a few ulps, 1e-5
    check("silu forward = x sigmoid(x)", e < 1e-5, "max |diff| %.2g (tol 1e-5)", e);
    check_grad("silu d input", dx, s.x, 64, &o, TOL_NONLINEAR);
    free(s.x); free(s.out); free(R); free(dx);
}

// ---- Linear ----
typedef struct { float *x, *w, *b, *out; int B, C_in, C_out; } LinCase;
static void lin_fwd(void* p) { LinCase* l = p; linear_forward(l->out, l->x, l->w, l->b, l->B, l->C_in, l->C_out); }

static void test_linear(void) {
    LinCase l = {0};
    l.B = 3; l.C_in = 7; l.C_out = 5;
    size_t nx = l.B * l.C_in, nw = l.C_out * l.C_in, no = l.B * l.C_out;
    l.x = randn(nx, 1); l.w = randn(nw, 0.5f); l.b = randn(l.C_out, 0.1f); l.out = fmalloc(no);
    float* R = randn(no, 1);
    FdProbe o = {lin_fwd, &l, l.out, no, R};
    lin_fwd(&l);
    float* dx = fmalloc(nx);
    float* dw = fmalloc(nw);
    float* db = fmalloc(l.C_out);
    linear_backward(dx, dw, db, R, l.x, l.w, l.B, l.C_in, l.C_out);
    check_grad("linear d input", dx, l.x, nx, &o, TOL_LINEAR);
    check_grad("linear d weight", dw, l.w, nw, &o, TOL_LINEAR);
    check_grad("linear d bias", db, l.b, l.C_out, &o, TOL_LINEAR);
#ifndef DDPM_PLAIN
    // the matmul-based kernels against the reference loops, on a shape past every tile
    int B = 37, Ci = 70, Co = 45;
    float *x = randn((size_t)B * Ci, 1), *w = randn((size_t)Co * Ci, 0.2f), *b = randn(Co, 0.1f), *dy = randn((size_t)B * Co, 1);
    float *y = fmalloc((size_t)B * Co), *yr = fmalloc((size_t)B * Co), *gx = fmalloc((size_t)B * Ci), *gxr = fmalloc((size_t)B * Ci);
    float *gw = fmalloc((size_t)Co * Ci), *gwr = fmalloc((size_t)Co * Ci), *gb = fmalloc(Co), *gbr = fmalloc(Co);
    linear_forward_fast(y, x, w, b, B, Ci, Co);
    REF(linear_forward, yr, x, w, b, B, Ci, Co);
    linear_backward_fast(gx, gw, gb, dy, x, w, B, Ci, Co);
    REF(linear_backward, gxr, gwr, gbr, dy, x, w, B, Ci, Co);
    double e = fmax(fmax(max_abs_diff(y, yr, (size_t)B * Co) / max_abs(yr, (size_t)B * Co),
                         max_abs_diff(gx, gxr, (size_t)B * Ci) / max_abs(gxr, (size_t)B * Ci)),
                    fmax(max_abs_diff(gw, gwr, (size_t)Co * Ci) / max_abs(gwr, (size_t)Co * Ci),
                         max_abs_diff(gb, gbr, Co) / max_abs(gbr, Co)));
    // float sums of <= 70 O(1) terms against double ones: ~1e-6 of the largest result
    check("linear fast (matmul) vs reference, forward and backward", e < 1e-5, "B 37, 70 -> 45: relative error %.2g (tol 1e-5)", e);
    free(x); free(w); free(b); free(dy); free(y); free(yr); free(gx); free(gxr); free(gw); free(gwr); free(gb); free(gbr);
#endif
    free(l.x); free(l.w); free(l.b); free(l.out); free(R); free(dx); free(dw); free(db);
}

// ---- attention ----
typedef struct { float *q, *k, *v, *out, *att; int B, C, N; } AttCase;
static void att_fwd(void* p) { AttCase* a = p; attention_forward(a->out, a->att, a->q, a->k, a->v, a->B, a->C, a->N, NULL); }

static void test_attention(void) {
    AttCase a = {0};
    a.B = 2; a.C = 4; a.N = 12;
    size_t n = (size_t)a.B * a.C * a.N;
    a.q = randn(n, 1); a.k = randn(n, 1); a.v = randn(n, 1);
    a.out = fmalloc(n); a.att = fmalloc((size_t)a.B * a.N * a.N);
    float* R = randn(n, 1);
    FdProbe o = {att_fwd, &a, a.out, n, R};
    att_fwd(&a);
    float* dq = fmalloc(n);
    float* dk = fmalloc(n);
    float* dv = fmalloc(n);
    layers_init();
    float* datt = fmalloc((size_t)kernel_threads * a.N * a.N);   // one N x N per thread
    // sampling keeps no weights: each thread's go to its slice of the scratch instead
    float* out2 = fmalloc(n);
    attention_forward(out2, NULL, a.q, a.k, a.v, a.B, a.C, a.N, datt);
    check("attention forward without saved weights (scratch instead): same bits",
          !memcmp(out2, a.out, n * sizeof(float)), "max |diff| %.3g", max_abs_diff(out2, a.out, n));
    free(out2);
    attention_backward(dq, dk, dv, R, a.q, a.k, a.v, a.att, a.B, a.C, a.N, datt);
    check_grad("attention d q", dq, a.q, n, &o, TOL_NONLINEAR);
    check_grad("attention d k", dk, a.k, n, &o, TOL_NONLINEAR);
    check_grad("attention d v", dv, a.v, n, &o, TOL_LINEAR);
#ifndef DDPM_PLAIN
    // the fast kernel (matmuls, column softmax with exp_approx) against the reference,
    // at the U-Net's 16x16 (N 256, past the 256-column blocks) and an odd N
    for (int big = 0; big <= 1; big++) {
        int B = 2, C = big ? 24 : 5, N = big ? 264 : 37;
        size_t nn = (size_t)B * C * N;
        float *q = randn(nn, 1), *k = randn(nn, 1), *v = randn(nn, 1), *dy = randn(nn, 1);
        float *y = fmalloc(nn), *yr = fmalloc(nn), *at = fmalloc((size_t)B * N * N), *atr = fmalloc((size_t)B * N * N);
        float *gq = fmalloc(nn), *gk = fmalloc(nn), *gv = fmalloc(nn), *gqr = fmalloc(nn), *gkr = fmalloc(nn), *gvr = fmalloc(nn);
        float* scr = fmalloc((size_t)kernel_threads * N * N);
        attention_forward_fast(y, at, q, k, v, B, C, N, scr);
        REF(attention_forward, yr, atr, q, k, v, B, C, N, scr);
        attention_backward_fast(gq, gk, gv, dy, q, k, v, at, B, C, N, scr);
        REF(attention_backward, gqr, gkr, gvr, dy, q, k, v, atr, B, C, N, scr);
        double e[4];
        double worst = rel_errors4(e, (float* [4]){y, gq, gk, gv}, (float* [4]){yr, gqr, gkr, gvr},
                                   (size_t[4]){nn, nn, nn, nn});
        // float matmuls of <= 264 terms and exp_approx against double sums and exp: ~1e-6
        check("attention fast vs reference (out, d q, d k, d v)", worst < 1e-5,
              "B %d, C %d, N %d: relative errors %.2g %.2g %.2g %.2g (tol 1e-5)", B, C, N, e[0], e[1], e[2], e[3]);
        free(q); free(k); free(v); free(dy); free(y); free(yr); free(at); free(atr);
        free(gq); free(gk); free(gv); free(gqr); free(gkr); free(gvr); free(scr);
    }
#endif
    free(a.q); free(a.k); free(a.v); free(a.out); free(a.att); free(R); free(dq); free(dk); free(dv); free(datt);
}

// ---- upsampling + conv, concat, add_channel_bias ----
typedef struct { float *x, *w, *b, *out, *ws; int B, C_in, H, W, C_out; } UpCase;
static void up_fwd(void* p) {
    UpCase* u = p;
    upsample_conv_forward(u->out, u->x, u->w, u->b, u->B, u->C_in, u->H, u->W, u->C_out, u->ws);
}

// Finite differences on the layer as the network calls it (for the fast kernel: the four
// phase 2x2 convs of 17.7, never materialising the upsampled image).
static void test_upsample_conv(void) {
    UpCase u = {0};
    u.B = 2; u.C_in = 3; u.H = 3; u.W = 4; u.C_out = 2;
    size_t nx = (size_t)u.B * u.C_in * u.H * u.W, nw = (size_t)u.C_out * u.C_in * 9, no = (size_t)u.B * u.C_out * 4 * u.H * u.W;
    u.x = randn(nx, 1); u.w = randn(nw, 0.3f); u.b = randn(u.C_out, 0.1f); u.out = fmalloc(no);
    layers_init();
    u.ws = fmalloc(upsample_conv_workspace_floats(u.B, u.C_in, u.H, u.W, u.C_out, kernel_threads));
    float *R = randn(no, 1), *dx = fmalloc(nx), *dw = fmalloc(nw), *db = fmalloc(u.C_out);
    FdProbe o = {up_fwd, &u, u.out, no, R};
    up_fwd(&u);
    upsample_conv_backward(dx, dw, db, R, u.x, u.w, u.B, u.C_in, u.H, u.W, u.C_out, u.ws);
    check_grad("upsample+conv d input", dx, u.x, nx, &o, TOL_LINEAR);
    check_grad("upsample+conv d weight", dw, u.w, nw, &o, TOL_LINEAR);
    check_grad("upsample+conv d bias", db, u.b, u.C_out, &o, TOL_LINEAR);
    free(u.x); free(u.w); free(u.b); free(u.out); free(u.ws); free(R); free(dx); free(dw); free(db);
}

#ifndef DDPM_PLAIN
// The fused upsampling conv (17.7) against upsample then conv2d, the reference.
static void test_upsample_conv_vs_ref(int B, int C_in, int C_out, int H, int W) {
    size_t nx = (size_t)B * C_in * H * W, nw = (size_t)C_out * C_in * 9, no = (size_t)B * C_out * 4 * H * W;
    float *x = randn(nx, 1), *w = randn(nw, 0.3f), *b = randn(C_out, 0.1f), *dy = randn(no, 1);
    layers_init();
    float* ws = fmalloc(upsample_conv_workspace_floats_fast(B, C_in, H, W, C_out, kernel_threads));
    float* wr = fmalloc(REF_SIZE(upsample_conv_workspace_floats, B, C_in, H, W, C_out, kernel_threads));
    float *y = fmalloc(no), *yr = fmalloc(no), *dx = fmalloc(nx), *dxr = fmalloc(nx);
    float *dw = fmalloc(nw), *dwr = fmalloc(nw), *db = fmalloc(C_out), *dbr = fmalloc(C_out);
    upsample_conv_forward_fast(y, x, w, b, B, C_in, H, W, C_out, ws);
    REF(upsample_conv_forward, yr, x, w, b, B, C_in, H, W, C_out, wr);
    upsample_conv_backward_fast(dx, dw, db, dy, x, w, B, C_in, H, W, C_out, ws);
    REF(upsample_conv_backward, dxr, dwr, dbr, dy, x, w, B, C_in, H, W, C_out, wr);
    double e[4];
    double worst = rel_errors4(e, (float* [4]){y, dx, dw, db}, (float* [4]){yr, dxr, dwr, dbr},
                               (size_t[4]){no, nx, nw, (size_t)C_out});
    // the phase weights sum up to 4 taps before the products: a few u sqrt(n) of the result
    check("upsample + 3x3 conv fused (4 phase 2x2 convs) vs upsample then the reference conv", worst < 1e-5,
          "B %d, C_in %d, C_out %d, %dx%d -> %dx%d: relative errors %.2g %.2g %.2g %.2g (tol 1e-5)",
          B, C_in, C_out, H, W, 2 * H, 2 * W, e[0], e[1], e[2], e[3]);
    free(x); free(w); free(b); free(dy); free(ws); free(wr); free(y); free(yr); free(dx); free(dxr);
    free(dw); free(dwr); free(db); free(dbr);
}
#endif

typedef struct { float *a, *b, *out; int B, Ca, Cb, HW; } CatCase;
static void cat_fwd(void* p) { CatCase* c = p; concat_forward(c->out, c->a, c->b, c->B, c->Ca, c->Cb, c->HW); }

typedef struct { float *h, *v, *out; int B, C, HW; } BiasCase;
static void bias_fwd(void* p) {
    BiasCase* c = p;
    memcpy(c->out, c->h, (size_t)c->B * c->C * c->HW * sizeof(float));
    add_channel_bias(c->out, c->v, c->B, c->C, c->HW);
}

static void test_small_layers(void) {
    int ok;
    float* R;
    // channel concatenation
    CatCase c = {0};
    c.B = 2; c.Ca = 3; c.Cb = 2; c.HW = 5;
    size_t na = (size_t)c.B * c.Ca * c.HW, nb = (size_t)c.B * c.Cb * c.HW, nc = na + nb;
    c.a = randn(na, 1); c.b = randn(nb, 1); c.out = fmalloc(nc);
    R = randn(nc, 1);
    FdProbe oc = {cat_fwd, &c, c.out, nc, R};
    cat_fwd(&c);
    ok = 1;
    for (int b = 0; b < c.B; b++)
        for (int ch = 0; ch < c.Ca + c.Cb; ch++)
            for (int i = 0; i < c.HW; i++)
                ok &= c.out[(b * (c.Ca + c.Cb) + ch) * c.HW + i] ==
                      (ch < c.Ca ? c.a[(b * c.Ca + ch) * c.HW + i] : c.b[(b * c.Cb + ch - c.Ca) * c.HW + i]);
    check("concat forward: [a ; b] along channels", ok, "B 2, 3 + 2 channels, exact");
    float* da = fmalloc(na);
    float* db = fmalloc(nb);
    concat_backward(da, db, R, c.B, c.Ca, c.Cb, c.HW);
    check_grad("concat d a", da, c.a, na, &oc, TOL_LINEAR);
    check_grad("concat d b", db, c.b, nb, &oc, TOL_LINEAR);
    free(c.a); free(c.b); free(c.out); free(R); free(da); free(db);

    // add_channel_bias; its backward is sum_channel (which writes, not accumulates)
    BiasCase bc = {0};
    bc.B = 2; bc.C = 3; bc.HW = 6;
    size_t nh = (size_t)bc.B * bc.C * bc.HW;
    bc.h = randn(nh, 1); bc.v = randn(bc.B * bc.C, 1); bc.out = fmalloc(nh);
    R = randn(nh, 1);
    FdProbe ob = {bias_fwd, &bc, bc.out, nh, R};
    float* dv = fmalloc(bc.B * bc.C);
    sum_channel(dv, R, bc.B, bc.C, bc.HW);
    check_grad("add_channel_bias d v = sum_channel", dv, bc.v, bc.B * bc.C, &ob, TOL_LINEAR);
    free(bc.h); free(bc.v); free(bc.out); free(R); free(dv);
}

// ---- dropout ----
static void test_dropout(void) {
    const size_t N = 100000;
    const float p = 0.1f;
    const uint64_t key = 0x1234abcdULL;
    float* x = randn(N, 1);
    for (size_t i = 0; i < N; i++) if (x[i] == 0) x[i] = 1;   // keep "dropped" == "zero"
    float* y = fmalloc(N);
    float* y2 = fmalloc(N);
    dropout_forward(y, x, N, p, key);
    size_t kept = 0;
    int scaled_ok = 1;
    float scale = 1.0f / (1.0f - p);
    for (size_t i = 0; i < N; i++)
        if (y[i] != 0) { kept++; scaled_ok &= y[i] == x[i] * scale; }
    // kept ~ Binomial(N, 1 - p): mean N(1-p), sd sqrt(N p (1-p)) ~ 95; allow 5 sd
    double mu = N * (1.0 - p), sd = sqrt(N * p * (1.0 - p));
    check("dropout keeps a fraction 1 - p", fabs(kept - mu) < 5 * sd,
          "%zu of %zu kept (expected %.0f +- %.0f), p = %.1f", kept, N, mu, 5 * sd, p);
    check("dropout scales kept values by 1/(1 - p)", scaled_ok, "out = in * %.9g on every kept value", scale);
    dropout_forward(y2, x, N, p, key);
    int same = !memcmp(y, y2, N * sizeof(float));
    dropout_forward(y2, x, N, p, key + 1);
    int differ = memcmp(y, y2, N * sizeof(float)) != 0;
    float* yin = fcopy(x, N);
    dropout_forward(yin, yin, N, p, key);   // in place, as the ResBlock uses it
    int inplace = !memcmp(y, yin, N * sizeof(float));
    check("dropout mask: same key same mask, other key other mask, in place ok", same && differ && inplace,
          "same %d, differ %d, in place %d", same, differ, inplace);
    // the backward pass rebuilds the mask from the key: dinp = dout / (1 - p) where kept
    float* dout = randn(N, 1);
    float* dx = fmalloc(N);
    dropout_backward(dx, dout, N, p, key);
    int mask_ok = 1;
    for (size_t i = 0; i < N; i++) mask_ok &= dx[i] == (y[i] != 0 ? dout[i] * scale : 0.0f);
    check("dropout backward uses the forward's mask", mask_ok, "dinp = dout * scale exactly where kept, 0 elsewhere");
    free(x); free(y); free(y2); free(yin); free(dout); free(dx);
}

#ifndef DDPM_PLAIN
// ----------------------------------------------------------------------------
// 17.1 matmul (a Part III kernel)

// C (+)= op(A) op(B), against a triple loop in double; leading dimensions padded by
// `pad` so that lda/ldb/ldc differ from the logical widths.
static void test_matmul_case(int M, int N, int K, int transA, int transB, int pad) {
    int lda = (transA ? M : K) + pad, ldb = (transB ? K : N) + pad, ldc = N + pad;
    int rowsA = transA ? K : M, rowsB = transB ? N : K;
    float* A = randn((size_t)rowsA * lda, 1);
    float* B = randn((size_t)rowsB * ldb, 1);
    float* C0 = randn((size_t)M * ldc, 1);
    float* C = fmalloc((size_t)M * ldc);
    double worst = 0;
    int pad_ok = 1;
    for (int acc = 0; acc <= 1; acc++) {
        memcpy(C, C0, (size_t)M * ldc * sizeof(float));
        matmul(C, A, B, M, N, K, lda, ldb, ldc, transA, transB, acc);
        for (int i = 0; i < M; i++) {
            for (int j = 0; j < N; j++) {
                double s = acc ? C0[(size_t)i * ldc + j] : 0, sa = fabs(s);
                for (int p = 0; p < K; p++) {
                    double a = transA ? A[(size_t)p * lda + i] : A[(size_t)i * lda + p];
                    double b = transB ? B[(size_t)j * ldb + p] : B[(size_t)p * ldb + j];
                    s += a * b; sa += fabs(a * b);
                }
                worst = fmax(worst, fabs(C[(size_t)i * ldc + j] - s) / sa);
            }
            for (int j = N; j < ldc; j++) pad_ok &= C[(size_t)i * ldc + j] == C0[(size_t)i * ldc + j];
        }
    }
    // Relative to sum_p |a b|: float sums of K terms err by ~sqrt(K) u (random-signed
    // roundings; 1.3e-6 for K = 513); the worst case K u (3e-5) needs every rounding to
    // go the same way. 1e-5 is ~8 standard deviations of the typical error.
    char name[96];
    snprintf(name, sizeof name, "matmul %dx%dx%d transA %d transB %d%s", M, N, K, transA, transB, pad ? " padded ld" : "");
    check(name, worst < 1e-5 && pad_ok, "accumulate 0 and 1: max err / sum|a b| %.2g (tol 1e-5), padding untouched %d",
          worst, pad_ok);
    free(A); free(B); free(C0); free(C);
}

static void test_matmul(void) {
    for (int t = 0; t < 4; t++) test_matmul_case(7, 45, 300, t >> 1, t & 1, 0);
    for (int t = 0; t < 4; t++) test_matmul_case(130, 70, 513, t >> 1, t & 1, 3);
    // K = 0 is an empty sum: C = 0, or unchanged when accumulating
    float A[1] = {1}, B[1] = {1}, C[6] = {1, 2, 3, 4, 5, 6};
    matmul(C, A, B, 2, 3, 0, 1, 3, 3, 0, 0, 1);
    int ok = C[0] == 1 && C[5] == 6;
    matmul(C, A, B, 2, 3, 0, 1, 3, 3, 0, 0, 0);
    for (int i = 0; i < 6; i++) ok &= C[i] == 0;
    check("matmul K = 0: empty sum", ok, "accumulate keeps C, overwrite zeroes it");

    // The same bits for any number of threads (the claim of section 17.1), as if the
    // program had been started with 1 and with 2 threads.
    int M = 257, N = 301, K = 700, threads = get_threads();
    float* A2 = randn((size_t)M * K, 1);
    float* B2 = randn((size_t)K * N, 1);
    float* C1 = fmalloc((size_t)M * N);
    float* C2 = fmalloc((size_t)M * N);
    int same = 1;
    for (int t = 0; t < 4; t++) {
        int tA = t >> 1, tB = t & 1;
        layers_reinit(1);
        matmul(C1, A2, B2, M, N, K, tA ? M : K, tB ? K : N, N, tA, tB, 0);
        layers_reinit(2);
        matmul(C2, A2, B2, M, N, K, tA ? M : K, tB ? K : N, N, tA, tB, 0);
        same &= !memcmp(C1, C2, (size_t)M * N * sizeof(float));
    }
    layers_reinit(threads);
    check("matmul bit-identical with 1 and 2 threads", same, "%dx%dx%d, all four transposes", M, N, K);
    free(A2); free(B2); free(C1); free(C2);

#ifdef _OPENMP
    // Called inside a parallel loop (conv2d runs one image per thread), matmul must pack
    // into the calling thread's own buffer (its comment says so): two threads sharing
    // one buffer race. A race shows only when threads really overlap, which a loaded
    // machine may never do, so this checks the contract directly: thread 1 of a team
    // calls matmul while thread 0 waits; thread 0's buffer (slot 0) must stay untouched.
    size_t slot = (size_t)GEMM_MC * GEMM_KC + (size_t)GEMM_KC * GEMM_NC;
    uint32_t sentinel = 0x7fc0dead;   // a NaN no packing can produce from finite inputs
    if (kernel_threads >= 2)        // main() sized the buffers for 2 threads at least
        for (size_t i = 0; i < 2 * slot; i++) memcpy(gemm_pack_buffer + i, &sentinel, 4);
    float* A3 = randn(64 * 64, 1);
    float* B3 = randn(64 * 64, 1);
    float* C3 = fmalloc(64 * 64);
    int team = 0;
    #pragma omp parallel num_threads(2)
    {
        #pragma omp single
        team = omp_get_num_threads();
        if (omp_get_thread_num() == 1) matmul(C3, A3, B3, 64, 64, 64, 64, 64, 64, 0, 0, 0);
    }
    size_t touched0 = 0, touched1 = 0;
    for (size_t i = 0; i < slot && kernel_threads >= 2; i++) {
        touched0 += memcmp(gemm_pack_buffer + i, &sentinel, 4) != 0;
        touched1 += memcmp(gemm_pack_buffer + slot + i, &sentinel, 4) != 0;
    }
    if (team == 2 && kernel_threads >= 2)
        check("matmul in a parallel loop packs into the calling thread's buffer", touched0 == 0 && touched1 > 0,
              "thread 1 wrote %zu floats of slot 0 (want 0) and %zu of slot 1", touched0, touched1);
    else
        note("matmul per-thread buffers: skipped, OpenMP gave a team of %d", team);
    free(A3); free(B3); free(C3);
#endif
}

#endif

// ----------------------------------------------------------------------------
// 16.9 the timestep embedding

static void test_timestep_embedding(void) {
    const int dim = 64, half = dim / 2, B = 5;
    int t[5] = {0, 1, 17, 500, 999};
    float* out = fmalloc((size_t)B * dim);
    timestep_embedding(out, t, B, dim);
    double e = 0;
    for (int b = 0; b < B; b++)
        for (int i = 0; i < half; i++) {
            long double f = expl(-logl(10000.0L) * i / (half - 1)), arg = t[b] * f;
            e = fmax(e, fabsl(out[b * dim + i] - sinl(arg)));
            e = fmax(e, fabsl(out[b * dim + half + i] - cosl(arg)));
        }
    // values in [-1, 1] rounded once to float (0.5 ulp = u); the double argument is good
    // to ~1e-13 even at t f_i ~ 1e3 rad. Tolerance one float ulp at 1.
    check("timestep embedding = [sin(t f_i), cos(t f_i)], f_i = 10000^(-i/(h-1))", e <= FLT_EPSILON,
          "max |diff| %.2g (tol %.2g), dim 64, t = 0, 1, 17, 500, 999", e, (double)FLT_EPSILON);
    free(out);
}

// ----------------------------------------------------------------------------
// 12-15 the configuration, the initialisation, the whole U-Net

// A small network with every kind of block: two levels (8x8, 4x4), attention at 4x4,
// a Downsample, an Upsample, 1x1 shortcuts.
static Config tiny_config(int in_ch, float dropout) {
    Config c = {0};
    c.in_ch = in_ch; c.img = 8; c.ch = 8; c.n_levels = 2; c.ch_mult[0] = 1; c.ch_mult[1] = 2;
    c.num_res_blocks = 1; c.n_attn = 1; c.attn_res[0] = 4; c.groups = 2; c.dropout = dropout;
    return c;
}

// Non-official random weights (as tests/dump_ref.c): the official init's 1e-10 scales
// would silence whole branches and hide their gradients.
static void unet_random_params(UNet* m, Rng* rng) {
    for (int i = 0; i < m->L->n_tensors; i++) {
        ParamTensor* t = &m->L->tensors[i];
        float* p = m->params + t->offset;
        size_t fan_in = t->numel / t->shape[0];
        rng_normal(rng, p, t->numel);
        for (size_t j = 0; j < t->numel; j++)
            p[j] = t->init == INIT_UNIFORM ? p[j] / sqrtf((float)fan_in) : t->init == INIT_ONE ? 1.0f + 0.2f * p[j] : 0.1f * p[j];
    }
}

// A first channel multiplier other than 1 (issue: norm_out and conv_out were built for ch
// channels while the last up block gives ch * ch_mult[0], so an image's output read its
// neighbour's channels): the output layers take what the up path gives, and every image's
// eps_theta is its own, whatever else is in the batch.
static void test_first_multiplier(void) {
    Config c = tiny_config(1, 0.0f);
    c.ch_mult[0] = 2; c.ch_mult[1] = 2; c.n_attn = 0;
    UNet m, one;
    unet_build(&m, &c, 2);
    unet_build(&one, &c, 1);
    Rng r;
    rng_seed(&r, 11);
    unet_random_params(&m, &r);
    memcpy(one.params, m.params, m.n_params * sizeof(float));
    size_t n = (size_t)c.in_ch * c.img * c.img;
    float* x = randn(2 * n, 1);
    int t_idx[2] = {10, 700};
    m.train = one.train = 0;
    m.no_grad = one.no_grad = 1;
    float* both = fcopy(unet_forward(&m, x, t_idx, 2), 2 * n);
    const float* alone = unet_forward(&one, x + n, t_idx + 1, 1);
    double d = max_abs_diff(both + n, alone, n);
    check("ch_mult 2,2: norm_out and conv_out take the last block's 16 channels; image 1's eps_theta is its own",
          m.L->norm_out.C == 16 && m.L->conv_out.C_in == 16 && d < 1e-5,
          "norm_out %d channels, conv_out from %d; image 1 in a batch of 2 vs alone: max |difference| %.2e",
          m.L->norm_out.C, m.L->conv_out.C_in, d);
    free(x); free(both);
    unet_free(&m);
    unet_free(&one);
}

static void test_config(void) {
    Config c;
    const char* names[3] = {"tiny", "small", "paper"};
    int all = 1;
    for (int i = 0; i < 3; i++) all &= preset_find(names[i], 32, &c) && config_check(&c, NULL) == NULL;
    check("presets found and valid", all, "tiny, small, paper");
    check("preset_find rejects unknown names", !preset_find("huge", 32, &c) && !preset_find("", 32, &c) && !preset_find("Tiny", 32, &c),
          "huge, \"\", Tiny");
    // paper256: the official unet2d16b2c112244 (LSUN, CelebA-HQ), counted from its plan
    // alone (building it would take 4 GiB)
    int found = preset_find("paper256", 0, &c);
    size_t n256 = found == 1 ? unet_count_params(&c) : 0;
    check("paper256: 256x256, six levels 1,1,2,2,4,4, attention at 16, no dropout, 113,673,219 parameters",
          found == 1 && !config_check(&c, NULL) && c.img == 256 && c.n_levels == 6 && c.ch_mult[4] == 4 &&
          c.n_attn == 1 && c.attn_res[0] == 16 && c.dropout == 0 && n256 == 113673219, "found %d, %zu parameters", found, n256);
    check("paper and paper256 exist at their own side only; tiny grows", preset_find("paper256", 64, &c) == -1 &&
          preset_find("paper", 256, &c) == -1 && preset_find("paper", 0, &c) == 1 && c.img == 32 &&
          preset_find("tiny", 256, &c) == 1 && c.n_levels == 6 && c.img == 256, "sides");
    const Preset* pl = preset_named("paper256");
    check("paper256's plan: batch 64, lr 2e-5, warmup 5000, sigma beta_tilde (the official LSUN run)",
          pl && pl->batch == 64 && pl->lr == 2e-5f && pl->warmup == 5000 && pl->var == VAR_FIXEDSMALL, "plan");
    preset_find("paper256", 0, &c);
    Config p32;
    preset_find("paper", 0, &p32);
    check("sampling batches by the network alone: 1 image of paper256, 64 of paper",
          eval_batch(&c, 64, 64) == 1 && eval_batch(&p32, 64, 64) == 64 && eval_batch(&p32, 5, 64) == 5,
          "%d, %d", eval_batch(&c, 64, 64), eval_batch(&p32, 64, 64));
    Config base = tiny_config(3, 0.1f);
    const char* err = config_check(&base, NULL);
    check("config_check accepts the test network", err == NULL, "%s", err ? err : "ok");

    // every case must be rejected with a reason
    struct { const char* what; Config c; } bad[16];
    int nb = 0;
    #define BAD(desc, stmt) do { bad[nb].what = desc; bad[nb].c = base; { Config* x = &bad[nb].c; stmt; } nb++; } while (0)
    BAD("ch 12 not divisible by groups 8", x->ch = 12; x->groups = 8);
    BAD("groups > ch", x->groups = 16);
    BAD("attention at 16, never reached (8, 4)", x->attn_res[0] = 16);
    BAD("attention at 2, never reached (8, 4)", x->attn_res[0] = 2);
    BAD("ch 0", x->ch = 0);
    BAD("ch -8", x->ch = -8);
    BAD("img 0", x->img = 0);
    BAD("img -8", x->img = -8);
    BAD("in_ch 0", x->in_ch = 0);
    BAD("groups 0", x->groups = 0);
    BAD("num_res_blocks 0", x->num_res_blocks = 0);
    BAD("n_levels 0", x->n_levels = 0);
    BAD("ch_mult 0", x->ch_mult[1] = 0);
    BAD("dropout -0.1", x->dropout = -0.1f);
    BAD("dropout 1", x->dropout = 1.0f);
    BAD("img 6 with 3 levels (not divisible by 4)", x->img = 6; x->n_levels = 3; x->ch_mult[2] = 2);
    #undef BAD
    int n_rejected = 0;
    char missed[512] = "";
    for (int i = 0; i < nb; i++) {
        const char* e = config_check(&bad[i].c, NULL);
        if (e && *e) n_rejected++;
        else { size_t l = strlen(missed); snprintf(missed + l, sizeof missed - l, "[%s] ", bad[i].what); }
    }
    check("config_check rejects bad configurations", n_rejected == nb, "%d of %d rejected %s", n_rejected, nb, missed);
    Config g = base;
    g.ch = 12; g.groups = 8;
    err = config_check(&g, NULL);
    check("config_check names the fields in the model's words", err && !strcmp(err, "ch 12 is not divisible by groups 8"),
          "\"%s\"", err ? err : "(accepted)");
    err = config_check(&g, &CONFIG_FLAGS);
    check("config_check names the flags when the command line asks", err && !strcmp(err, "--ch 12 is not divisible by --groups 8"),
          "\"%s\"", err ? err : "(accepted)");
}

static void test_unet_init(void) {
    const char* names[3] = {"paper", "tiny", "small"};
    const size_t want[3] = {35746307, 1113955, 4437699};
    for (int i = 0; i < 3; i++) {
        Config c;
        preset_find(names[i], 32, &c);
        UNet m;
        unet_build(&m, &c, 1);
        char name[64];
        snprintf(name, sizeof name, "n_params of preset %s", names[i]);
        check(name, m.n_params == want[i], "%zu (want %zu), %d tensors, %d blocks", m.n_params, want[i], m.L->n_tensors, m.L->n_blocks);
        unet_free(&m);
    }

    Config c;
    preset_find("tiny", 32, &c);
    UNet m;
    unet_build(&m, &c, 1);
    Rng rng;
    rng_seed(&rng, 7);
    unet_init(&m, &rng);
    int bounds_ok = 1, uniform_ok = 1, small_ok = 1, zero_ok = 1, one_ok = 1, n_small = 0, n_zero = 0, n_one = 0;
    size_t covered = 0;
    char bad[256] = "";
    for (int i = 0; i < m.L->n_tensors; i++) {
        ParamTensor* t = &m.L->tensors[i];
        const float* p = m.params + t->offset;
        covered += t->numel;
        size_t len = strlen(t->name);
        int ends = 0;
        const char* last[3] = {"conv2.weight", "proj_out.weight", "conv_out.weight"};
        for (int k = 0; k < 3; k++) { size_t l = strlen(last[k]); ends |= len >= l && !strcmp(t->name + len - l, last[k]); }
        if (t->init == INIT_UNIFORM) {
            // the bound from the shape, independently: fan_in = C_in K K, fan_out = C_out K K
            int K2 = t->ndim == 4 ? t->shape[2] * t->shape[3] : 1;
            double fi = (double)t->shape[1] * K2, fo = (double)t->shape[0] * K2, scale = ends ? 1e-10 : 1;
            double bound = sqrt(3 * scale / ((fi + fo) / 2)), mx = 0, ss = 0;
            for (size_t j = 0; j < t->numel; j++) { mx = fmax(mx, fabs(p[j])); ss += (double)p[j] * p[j]; }
            if (fabs(t->bound - bound) > 1e-6 * bound || mx > t->bound) {
                bounds_ok = 0;
                snprintf(bad, sizeof bad, "%s: bound %g (want %g), max %g", t->name, t->bound, bound, mx);
            }
            if (t->numel >= 256) {
                // U(-b, b): max within 5% of b (P(miss) = 0.95^n < 2e-6), and mean square
                // b^2/3 within 5 standard errors: sd of x^2 is b^2 sqrt(4/45), so the
                // relative tolerance is 5 * 3 * sqrt(4/45) / sqrt(n).
                double ms = ss / t->numel, tol = 5 * 3 * sqrt(4.0 / 45) / sqrt((double)t->numel);
                if (mx < 0.95 * bound || fabs(ms / (bound * bound / 3) - 1) > tol) uniform_ok = 0;
            }
            if (ends) { n_small++; small_ok &= mx < 1e-4 && mx > 0; }
            else small_ok &= bound > 1e-3;
        } else if (t->init == INIT_ZERO) {
            n_zero++;
            zero_ok &= len > 4 && !strcmp(t->name + len - 4, "bias");
            for (size_t j = 0; j < t->numel; j++) zero_ok &= p[j] == 0.0f;
        } else {
            n_one++;
            one_ok &= strstr(t->name, "norm") != NULL;
            for (size_t j = 0; j < t->numel; j++) one_ok &= p[j] == 1.0f;
        }
    }
    check("unet_init: weights within +-init_bound (fan_avg, uniform)", bounds_ok && covered == m.n_params,
          "%d tensors cover %zu of %zu params %s", m.L->n_tensors, covered, m.n_params, bad);
    check("unet_init: roughly uniform (max ~ bound, mean square ~ bound^2/3)", uniform_ok, "tensors of >= 256 values");
    check("unet_init: conv2, proj_out, conv_out at scale 1e-10 (~1e-6)", small_ok && n_small > 0,
          "%d such tensors, all |w| < 1e-4, every other bound > 1e-3", n_small);
    check("unet_init: biases 0, GroupNorm gamma 1, beta 0", zero_ok && one_ok && n_zero > 0 && n_one > 0,
          "%d zero tensors (all named *bias), %d one tensors (all GroupNorm)", n_zero, n_one);
    unet_free(&m);
}

// x_t, t, eps for the whole-network tests
typedef struct { float *x, *eps, *d; int t[4]; int B; size_t n; } NetInput;

static NetInput net_input(const Config* c, int B) {
    NetInput in;
    in.B = B;
    in.n = (size_t)B * c->in_ch * c->img * c->img;
    in.x = randn(in.n, 1);
    in.eps = randn(in.n, 1);
    in.d = fmalloc(in.n);
    for (int b = 0; b < 4; b++) in.t[b] = rng_int(&trng, 1000);
    return in;
}

static void net_input_free(NetInput* in) { free(in->x); free(in->eps); free(in->d); }

// one forward and backward pass of L_simple; returns the loss (in double)
static double net_step(UNet* m, NetInput* in) {
    float* e = unet_forward(m, in->x, in->t, in->B);
    double L = 0;
    for (size_t i = 0; i < in->n; i++) L += ((double)e[i] - in->eps[i]) * ((double)e[i] - in->eps[i]);
    l_simple(in->d, e, in->eps, in->n);
    unet_zero_grad(m);
    unet_backward(m, in->d, in->B);
    return L / in->n;
}

static void test_unet_determinism(void) {
    Config c = tiny_config(3, 0.1f);
    const int B = 2;
    UNet m;
    unet_build(&m, &c, B);
    Rng rng;
    rng_seed(&rng, 11);
    unet_random_params(&m, &rng);
    NetInput in = net_input(&c, B);
    m.train = 1;               // dropout on, with a fixed key
    m.dropout_key = 0xfeedULL;
    net_step(&m, &in);
    float* g1 = fcopy(m.grads, m.n_params);
    float* e1 = fcopy(m.L->eps_theta, in.n);
    net_step(&m, &in);
    int same = !memcmp(g1, m.grads, m.n_params * sizeof(float)) && !memcmp(e1, m.L->eps_theta, in.n * sizeof(float));
    check("unet: two forward+backward runs give bit-identical grads", same, "%zu params, dropout 0.1 on", m.n_params);

    // thread counts (fresh matmul buffers and tiles, as a different --threads would give)
    int threads = get_threads();
    layers_reinit(1);
    net_step(&m, &in);
    float* g_one = fcopy(m.grads, m.n_params);
    layers_reinit(2);
    net_step(&m, &in);
    same = !memcmp(g_one, m.grads, m.n_params * sizeof(float)) && !memcmp(g1, m.grads, m.n_params * sizeof(float));
    layers_reinit(threads);
    check("unet: grads bit-identical with 1 and 2 threads", same, "forward + backward");

    // a network built for more images than it is given computes the same bits
    UNet big;
    unet_build(&big, &c, 3);
    memcpy(big.params, m.params, m.n_params * sizeof(float));
    big.train = 1;
    big.dropout_key = m.dropout_key;
    net_step(&big, &in);
    same = big.n_params == m.n_params && !memcmp(g1, big.grads, m.n_params * sizeof(float)) &&
           !memcmp(e1, big.L->eps_theta, in.n * sizeof(float));
    check("unet: batch 2 in a network built for 3 gives the same bits", same, "B_max 3 vs 2");
    unet_free(&big);
    free(g1); free(e1); free(g_one);
    net_input_free(&in);
    unet_free(&m);
}

static void test_unet_gradient(void) {
    Config c = tiny_config(1, 0.0f);
    const int B = 2, n_probe = 20;
    UNet m;
    unet_build(&m, &c, B);
    Rng rng;
    rng_seed(&rng, 5);
    unet_random_params(&m, &rng);
    m.train = 0;
    NetInput in = net_input(&c, B);
    net_step(&m, &in);
    float* g = fcopy(m.grads, m.n_params);
    // probe one parameter in each of 20 tensors spread over the network, in order
    float ana[20], num[20];
    int which[20];
    const float h = 1e-2f;
    double norm_ana = 0, norm_err = 0, worst = 0;
    int threads = get_threads();
    set_threads(1);   // 40 small forward passes: see numeric_grad
    for (int k = 0; k < n_probe; k++) {
        ParamTensor* t = &m.L->tensors[(int)((k + 0.5) * m.L->n_tensors / n_probe)];
        size_t i = t->offset + (size_t)rng_int(&trng, (int)t->numel);
        which[k] = (int)(t - m.L->tensors);
        float p0 = m.params[i];
        m.params[i] = p0 + h; float pp = m.params[i];
        float* e = unet_forward(&m, in.x, in.t, B);
        double Lp = 0, Lm = 0;
        for (size_t j = 0; j < in.n; j++) Lp += ((double)e[j] - in.eps[j]) * ((double)e[j] - in.eps[j]);
        m.params[i] = p0 - h; float pm = m.params[i];
        e = unet_forward(&m, in.x, in.t, B);
        for (size_t j = 0; j < in.n; j++) Lm += ((double)e[j] - in.eps[j]) * ((double)e[j] - in.eps[j]);
        m.params[i] = p0;
        num[k] = (float)((Lp - Lm) / in.n / ((double)pp - pm));
        ana[k] = g[i];
        norm_ana += (double)ana[k] * ana[k];
        norm_err += ((double)ana[k] - num[k]) * ((double)ana[k] - num[k]);
    }
    set_threads(threads);
    // Normwise relative error over the 20 probes. Truncation (h^2 |L'''| / 6) and the float
    // rounding of L (~1e-7 relative of L ~ 2, divided by 2h: ~1e-5 absolute, against
    // gradients of rms ~2e-2) each stay below ~1e-3; observed ~1e-4. A wrong or missing
    // term of the backward pass is an O(1) relative error, so 2e-3 separates the two.
    double rel = sqrt(norm_err / norm_ana);
    for (int k = 0; k < n_probe; k++) worst = fmax(worst, fabs(ana[k] - num[k]));
    check("unet: dL_simple/dtheta vs finite differences (20 params)", rel < 2e-3,
          "normwise rel err %.2g (tol 2e-3), max |diff| %.2g, |grad| rms %.2g", rel, worst, sqrt(norm_ana / n_probe));
    if (!(rel < 2e-3))
        for (int k = 0; k < n_probe; k++)
            printf("    %-40s analytic %+.6e numeric %+.6e\n", m.L->tensors[which[k]].name, ana[k], num[k]);
    free(g);
    net_input_free(&in);
    unet_free(&m);
}

// ----------------------------------------------------------------------------
// 18. The data loaders

static uint8_t cifar_pixel(int n, int i) { return (uint8_t)((n * 37 + i * 11) % 256); }
static uint8_t fmnist_pixel(int n, int i) { return (uint8_t)((n * 53 + i * 7 + 1) % 256); }

// CIFAR-10 binary: records of a label byte and 3072 bytes (R, G, B planes of 32x32).
static void write_cifar(const char* path, int count, int first, int bad_label_at, long extra_bytes) {
    size_t size = (size_t)count * CIFAR_RECORD + extra_bytes;
    uint8_t* buf = calloc_check(size ? size : 1, 1, "test");
    for (int r = 0; r < count; r++) {
        uint8_t* rec = buf + (size_t)r * CIFAR_RECORD;
        rec[0] = r == bad_label_at ? 10 : (uint8_t)((first + r) % 10);
        for (int i = 0; i < 3072; i++) rec[1 + i] = cifar_pixel(first + r, i);
    }
    write_bytes(path, buf, size);
    free(buf);
}

static void put_be32(uint8_t* p, uint32_t v) { p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v; }

// IDX images: magic, N, rows, cols, then N*rows*cols bytes (or `data_n` images' worth).
static void write_idx_images(const char* path, uint32_t magic, int n, int rows, int cols, int data_n) {
    size_t size = 16 + (size_t)data_n * rows * cols;
    uint8_t* buf = calloc_check(size, 1, "test");
    put_be32(buf, magic); put_be32(buf + 4, n); put_be32(buf + 8, rows); put_be32(buf + 12, cols);
    for (int k = 0; k < data_n; k++)
        for (int i = 0; i < rows * cols; i++) buf[16 + (size_t)k * rows * cols + i] = fmnist_pixel(k, i);
    write_bytes(path, buf, size);
    free(buf);
}

static void write_idx_labels(const char* path, uint32_t magic, int n, int bad_label_at) {
    uint8_t* buf = calloc_check(8 + (size_t)n, 1, "test");
    put_be32(buf, magic); put_be32(buf + 4, n);
    for (int k = 0; k < n; k++) buf[8 + k] = k == bad_label_at ? 200 : (uint8_t)((k * 3) % 10);
    write_bytes(path, buf, 8 + (size_t)n);
    free(buf);
}

typedef struct { const char* name; const char* dir; int train; } LoadArgs;

static void load_child(void* p) {
    LoadArgs* a = p;
    Dataset d;
    dataset_load(&d, a->name, a->dir, a->train);
}

static void test_cifar10(void) {
    const char* dir = OUT "/data";
    mkdir_or_die(dir);
    mkdir_or_die(OUT "/data/cifar-10-batches-bin");
    const int counts[5] = {2, 3, 1, 2, 1};
    char path[256];
    for (int i = 0, first = 0; i < 5; first += counts[i], i++) {
        snprintf(path, sizeof path, "%s/cifar-10-batches-bin/data_batch_%d.bin", dir, i + 1);
        write_cifar(path, counts[i], first, -1, 0);
    }
    write_cifar(OUT "/data/cifar-10-batches-bin/test_batch.bin", 3, 100, -1, 0);

    Dataset d;
    dataset_load(&d, "cifar10", dir, 1);
    int ok = d.N == 9 && d.C == 3 && d.H == 32 && d.W == 32;
    for (int n = 0; ok && n < d.N; n++) {
        ok &= d.labels[n] == n % 10;
        for (int i = 0; i < 3072; i++) ok &= d.pixels[(size_t)n * 3072 + i] == cifar_pixel(n, i);
    }
    check("cifar10 train: 5 files, N, labels, pixels", ok, "N %d (want 9), %dx%dx%d", d.N, d.C, d.H, d.W);

    // §3.3: bytes 0..255 scaled linearly to [-1, 1]
    float x[3072], xf[3072];
    double e = 0;
    int ends = 1, n0 = 0, n255 = 0;
    for (int n = 0; n < d.N; n++) {
        dataset_image(x, &d, n, 0);
        for (int i = 0; i < 3072; i++) {
            int v = d.pixels[(size_t)n * 3072 + i];
            e = fmax(e, fabs(x[i] - (2.0 * v - 255) / 255));
            if (v == 0) { n0++; ends &= x[i] == -1.0f; }
            if (v == 255) { n255++; ends &= x[i] == 1.0f; }
        }
    }
    // v / 127.5 - 1 in float: two roundings of values <= 2: <= 2 ulp at 1 (2 FLT_EPSILON)
    check("dataset_image scales to [-1, 1]", e <= 2 * FLT_EPSILON && ends && n0 > 0 && n255 > 0,
          "max |x - (2v-255)/255| %.2g; 0 -> -1 and 255 -> 1 exactly (%d, %d pixels)", e, n0, n255);
    dataset_image(x, &d, 4, 0);
    dataset_image(xf, &d, 4, 1);
    ok = 1;
    for (int c = 0; c < 3; c++)
        for (int y = 0; y < 32; y++)
            for (int xx = 0; xx < 32; xx++) ok &= xf[(c * 32 + y) * 32 + xx] == x[(c * 32 + y) * 32 + 31 - xx];
    check("dataset_image flip mirrors left-right", ok, "every channel and row");
    dataset_free(&d);

    dataset_load(&d, "cifar10", dir, 0);
    ok = d.N == 3;
    for (int n = 0; ok && n < 3; n++) {
        ok &= d.labels[n] == (100 + n) % 10;
        for (int i = 0; i < 3072; i++) ok &= d.pixels[(size_t)n * 3072 + i] == cifar_pixel(100 + n, i);
    }
    check("cifar10 test split: test_batch.bin", ok, "N %d (want 3)", d.N);
    dataset_free(&d);

    // bad data: each in its own folder, loaded as the test split (one file)
    struct { const char* what; int count, bad_label; long extra; } bad[3] = {
        {"cifar10 size not a multiple of 3073", 2, -1, 5},
        {"cifar10 empty file", 0, -1, 0},
        {"cifar10 label > 9", 3, 1, 0}};
    for (int k = 0; k < 3; k++) {
        char bdir[128], sub[160];
        snprintf(bdir, sizeof bdir, OUT "/bad_cifar%d", k);
        snprintf(sub, sizeof sub, "%s/cifar-10-batches-bin", bdir);
        mkdir_or_die(bdir);
        mkdir_or_die(sub);
        snprintf(path, sizeof path, "%s/test_batch.bin", sub);
        write_cifar(path, bad[k].count, 0, bad[k].bad_label, bad[k].extra);
        LoadArgs a = {"cifar10", bdir, 0};
        expect_die(bad[k].what, load_child, &a, path);
    }
    mkdir_or_die(OUT "/empty");
    LoadArgs a = {"cifar10", OUT "/empty", 1};
    expect_die("cifar10 missing file", load_child, &a, OUT "/empty/cifar-10-batches-bin/data_batch_1.bin");
    LoadArgs u = {"mnist", dir, 1};
    expect_die("unknown dataset name", load_child, &u, "mnist");
}

static void test_fashion_mnist(void) {
    const char* dir = OUT "/data";
    mkdir_or_die(dir);
    mkdir_or_die(OUT "/data/fashion-mnist");
    write_idx_images(OUT "/data/fashion-mnist/train-images-idx3-ubyte", 0x803, 3, 28, 28, 3);
    write_idx_labels(OUT "/data/fashion-mnist/train-labels-idx1-ubyte", 0x801, 3, -1);
    write_idx_images(OUT "/data/fashion-mnist/t10k-images-idx3-ubyte", 0x803, 2, 28, 28, 2);
    write_idx_labels(OUT "/data/fashion-mnist/t10k-labels-idx1-ubyte", 0x801, 2, -1);
    for (int train = 1; train >= 0; train--) {
        Dataset d;
        dataset_load(&d, "fashion-mnist", dir, train);
        int want_n = train ? 3 : 2, ok = d.N == want_n && d.C == 1 && d.H == 32 && d.W == 32, border = 1;
        float x[1024];
        for (int n = 0; ok && n < d.N; n++) {
            ok &= d.labels[n] == (n * 3) % 10;
            dataset_image(x, &d, n, 0);
            for (int y = 0; y < 32; y++)
                for (int xx = 0; xx < 32; xx++) {
                    int in = y >= 2 && y < 30 && xx >= 2 && xx < 30;
                    uint8_t want = in ? fmnist_pixel(n, (y - 2) * 28 + xx - 2) : 0;
                    ok &= d.pixels[(size_t)n * 1024 + y * 32 + xx] == want;
                    if (!in) border &= x[y * 32 + xx] == -1.0f;
                }
        }
        check(train ? "fashion-mnist train: 28x28 padded to 32x32, labels" : "fashion-mnist t10k split",
              ok && border, "N %d (want %d), %dx%dx%d, 2-pixel border = -1: %d", d.N, want_n, d.C, d.H, d.W, border);
        dataset_free(&d);
    }

    // bad data, each in its own folder: (images: magic, N, rows, data images; labels: N, bad)
    struct { const char* what; uint32_t imagic; int n, rows, data_n; uint32_t lmagic; int ln, lbad; int names_labels; } bad[7] = {
        {"IDX bad magic (gzipped?)", 0x1f8b0808, 3, 28, 3, 0x801, 3, -1, 0},
        {"IDX truncated (size disagrees with header)", 0x803, 3, 28, 2, 0x801, 3, -1, 0},
        {"IDX wrong shape 27x28", 0x803, 3, 27, 3, 0x801, 3, -1, 0},
        {"IDX label count mismatch", 0x803, 3, 28, 3, 0x801, 2, -1, 0},
        {"IDX label > 9", 0x803, 3, 28, 3, 0x801, 3, 1, 1},
        {"IDX labels file with the images magic", 0x803, 3, 28, 3, 0x803, 3, -1, 1},
        {"IDX with zero images", 0x803, 0, 28, 0, 0x801, 0, -1, 0}};
    for (int k = 0; k < 7; k++) {
        char bdir[128], sub[160], ipath[256], lpath[256];
        snprintf(bdir, sizeof bdir, OUT "/bad_fmnist%d", k);
        snprintf(sub, sizeof sub, "%s/fashion-mnist", bdir);
        mkdir_or_die(bdir);
        mkdir_or_die(sub);
        snprintf(ipath, sizeof ipath, "%s/train-images-idx3-ubyte", sub);
        snprintf(lpath, sizeof lpath, "%s/train-labels-idx1-ubyte", sub);
        write_idx_images(ipath, bad[k].imagic, bad[k].n, bad[k].rows, 28, bad[k].data_n);
        write_idx_labels(lpath, bad[k].lmagic, bad[k].ln, bad[k].lbad);
        LoadArgs a = {"fashion-mnist", bdir, 1};
        expect_die(bad[k].what, load_child, &a, bad[k].names_labels ? lpath : ipath);
    }
    mkdir_or_die(OUT "/empty");
    LoadArgs a = {"fashion-mnist", OUT "/empty", 0};
    expect_die("fashion-mnist missing file", load_child, &a, OUT "/empty/fashion-mnist/t10k-images-idx3-ubyte");
}

// ----------------------------------------------------------------------------
// 19. Checkpoints

typedef struct { Trainer* tr; const char* path; } CkptArgs;

static void ckpt_load_child(void* p) { CkptArgs* a = p; checkpoint_load(a->tr, a->path); }

static void ckpt_open_child(void* p) {
    CkptArgs* a = p;
    CheckpointHeader hd;
    FILE* f = checkpoint_open(a->path, &hd);
    fclose(f);
}

static int same_bytes(const char* path, const uint8_t* want, size_t n) {
    size_t m = 0;
    uint8_t* got = read_bytes(path, &m);
    int same = got && m == n && !memcmp(got, want, n);
    free(got);
    return same;
}

// The non-finite guards of 9 and 19: a step whose loss is not finite returns before
// anything is updated, a diverged state is never saved, and the temporary file of a save
// cannot be a planted link (its target stays as it was).
static void test_nonfinite_and_links(void) {
    Config c = tiny_config(3, 0.0f);
    Trainer tr;
    trainer_init(&tr, &c, &PAPER_OBJECTIVE, 2, 1, SCHEDULE_LINEAR, &PAPER_HYPER, 7);
    train_step(&tr, noise_data(&tr.net.cfg));
    size_t n = tr.net.n_params;
    tr.net.params[n / 2] = NAN;
    float *p = fcopy(tr.net.params, n), *e = fcopy(tr.ema, n), *m1 = fcopy(tr.adam_m, n), *v1 = fcopy(tr.adam_v, n);
    uint64_t step = tr.step;
    StepStats st = train_step(&tr, noise_data(&tr.net.cfg));
    int same = !memcmp(p, tr.net.params, n * 4) && !memcmp(e, tr.ema, n * 4) && !memcmp(m1, tr.adam_m, n * 4) &&
               !memcmp(v1, tr.adam_v, n * 4) && tr.step == step;
    check("a non-finite loss: train_step returns it and updates nothing", !isfinite(st.loss) && same,
          "loss %g, state unchanged %d, step %llu -> %llu", st.loss, same, (unsigned long long)step,
          (unsigned long long)tr.step);
    char err[4400] = "";
    const char* path = OUT "/nan.ckpt";
    int rc = checkpoint_save(&tr, SCHEDULE_LINEAR, path, err, sizeof err);
    check("checkpoint_save refuses non-finite parameters", rc != 0 && !exists(path) && strstr(err, "not finite"),
          "rc %d, file %d, \"%s\"", rc, exists(path), err);
    tr.net.params[n / 2] = 0.0f;
    write_bytes(OUT "/target", "keep", 4);
    int linked = symlink("target", OUT "/link.ckpt.tmp") == 0;
    rc = checkpoint_save(&tr, SCHEDULE_LINEAR, OUT "/link.ckpt", err, sizeof err);
    size_t k = 0;
    uint8_t* t = read_bytes(OUT "/target", &k);
    struct stat sb;
    int regular = lstat(OUT "/link.ckpt", &sb) == 0 && S_ISREG(sb.st_mode);
    check("checkpoint_save through a planted .tmp link leaves the link's target alone", linked && rc == 0 &&
          k == 4 && !memcmp(t, "keep", 4) && regular, "link %d, rc %d, target %zu bytes, checkpoint regular %d",
          linked, rc, k, regular);
    free(t); free(p); free(e); free(m1); free(v1);
    trainer_free(&tr);
}

// Every byte of a checkpoint's header edited (two bit flips each) and the checksum
// re-sealed, as a hostile user would: each file must be refused in one line, exit 1, or
// load as a consistent network; never a crash, and never a big allocation first (the
// child runs under a 1 GB address-space limit, so "out of memory" counts as a failure).
static void test_resealed_headers(void) {
    Config c = tiny_config(3, 0.1f);
    Trainer tr;
    trainer_init(&tr, &c, &PAPER_OBJECTIVE, 2, 1, SCHEDULE_LINEAR, &PAPER_HYPER, 3);
    char err[4400] = "";
    const char* good = OUT "/sealed.ckpt";
    const char* bad = OUT "/resealed.ckpt";
    const char* errpath = OUT "/resealed_stderr.txt";
    checkpoint_save(&tr, SCHEDULE_LINEAR, good, err, sizeof err);
    trainer_free(&tr);
    size_t n = 0;
    uint8_t* b = read_bytes(good, &n);
    int crashed = 0, wordy = 0, oom = 0, accepted = 0, refused = 0, first_bad = -1;
    for (int off = 0; off < (int)sizeof(CheckpointHeader); off++)
        for (int mask = 1; mask <= 0x80; mask <<= 7) {
            b[off] ^= (uint8_t)mask;
            Fnv sum = FNV_START;
            fnv_update(&sum, b, n - 8);
            memcpy(b + n - 8, &sum.h, 8);
            write_bytes(bad, b, n);
            b[off] ^= (uint8_t)mask;
            fflush(stdout);
            pid_t pid = fork();
            if (pid == 0) {
                if (!freopen(errpath, "w", stderr)) _exit(3);
#ifndef __SANITIZE_ADDRESS__
                struct rlimit lim = {(rlim_t)1 << 30, (rlim_t)1 << 30};
                setrlimit(RLIMIT_AS, &lim);
#endif
                UNet m;
                Schedule sc;
                load_ema_model(&m, &sc, NULL, bad, 1);
                _exit(0);
            }
            int status = 0;
            waitpid(pid, &status, 0);
            size_t k = 0;
            uint8_t* msg = read_bytes(errpath, &k);
            int lines = 0;
            char text[1024] = "";
            for (size_t i = 0; i < k; i++) lines += msg[i] == '\n';
            if (msg) snprintf(text, sizeof text, "%.*s", (int)(k < 1000 ? k : 1000), (const char*)msg);
            int is_oom = strstr(text, "out of memory") != NULL;
            free(msg);
            int code = WIFEXITED(status) ? WEXITSTATUS(status) : -1, bad_case = 0;
            if (WIFSIGNALED(status)) { crashed++; bad_case = 1; }
            else if (code == 0) accepted++;
            else if (code == 1 && lines == 1 && !is_oom) refused++;
            else { wordy += !is_oom; oom += is_oom; bad_case = 1; }
            if (bad_case && first_bad < 0) first_bad = off;
        }
    check("every header byte edited and re-sealed: refused in one line or loaded, no crash, no big allocation",
          !crashed && !wordy && !oom, "%d refused, %d loaded (fields that keep the network consistent), %d crashed, "
          "%d not one line, %d out of memory (first bad offset %d)", refused, accepted, crashed, wordy, oom, first_bad);
    free(b);
    unlink(good); unlink(bad); unlink(errpath);
}

static void test_checkpoints(void) {
    Config c = tiny_config(3, 0.1f);
    const char* path = OUT "/ck.ckpt";
    char err[4400] = "";   // room for any path (and no -Wformat-truncation)
    Trainer tr;
    trainer_init(&tr, &c, &PAPER_OBJECTIVE, 2, 1, SCHEDULE_LINEAR, &PAPER_HYPER, 42);
    train_step(&tr, noise_data(&tr.net.cfg));
    train_step(&tr, noise_data(&tr.net.cfg));
    int rc = checkpoint_save(&tr, SCHEDULE_LINEAR, path, err, sizeof err);
    check("checkpoint_save writes and leaves no .tmp", rc == 0 && exists(path) && !exists(OUT "/ck.ckpt.tmp"),
          "rc %d %s", rc, err);

    Trainer tr2;
    trainer_init(&tr2, &c, &PAPER_OBJECTIVE, 2, 1, SCHEDULE_LINEAR, &PAPER_HYPER, 4242);   // other seed: other weights
    checkpoint_load(&tr2, path);
    size_t nb = tr.net.n_params * sizeof(float);
    int arrays = !memcmp(tr.net.params, tr2.net.params, nb) && !memcmp(tr.ema, tr2.ema, nb) &&
                 !memcmp(tr.adam_m, tr2.adam_m, nb) && !memcmp(tr.adam_v, tr2.adam_v, nb);
    check("checkpoint round trip: params, ema, adam_m, adam_v bit-identical", arrays, "%zu params each", tr.net.n_params);
    check("checkpoint round trip: step and RNG state", tr2.step == 2 && !memcmp(tr.rng.s, tr2.rng.s, sizeof tr.rng.s),
          "step %llu (want 2)", (unsigned long long)tr2.step);
    // "everything needed to continue bit-exactly": the next step is the same on both
    train_step(&tr, noise_data(&tr.net.cfg));
    train_step(&tr2, noise_data(&tr2.net.cfg));
    arrays = !memcmp(tr.net.params, tr2.net.params, nb) && !memcmp(tr.ema, tr2.ema, nb) &&
             !memcmp(tr.adam_m, tr2.adam_m, nb) && !memcmp(tr.adam_v, tr2.adam_v, nb) && tr.step == tr2.step;
    check("checkpoint resume: the next train_step is bit-identical", arrays, "step %llu", (unsigned long long)tr.step);

    // corrupt files: each must end in exit 1 with one line naming the file
    size_t size = 0;
    uint8_t* good = read_bytes(path, &size);
    uint8_t* buf = malloc_check(size, "test");
    char bad[128];
    CkptArgs a = {&tr2, bad};

    snprintf(bad, sizeof bad, OUT "/truncated.ckpt");
    write_bytes(bad, good, size - 100);
    expect_die("checkpoint truncated (last 100 bytes dropped)", ckpt_load_child, &a, bad);

    memcpy(buf, good, size);
    buf[sizeof(CheckpointHeader) + nb / 2] ^= 0x10;   // one bit in the middle of the parameters
    snprintf(bad, sizeof bad, OUT "/flipped.ckpt");
    write_bytes(bad, buf, size);
    expect_die("checkpoint one flipped byte in the parameters (checksum)", ckpt_load_child, &a, bad);

    memcpy(buf, good, size);
    memcpy(buf, "\x89PNG\r\n\x1a\n", 8);   // a foreign file of the same size
    for (size_t i = 8; i < size; i++) buf[i] = (uint8_t)rng_u64(&trng);
    snprintf(bad, sizeof bad, OUT "/foreign.ckpt");
    write_bytes(bad, buf, size);
    expect_die("checkpoint foreign file (PNG header, bad magic)", ckpt_load_child, &a, bad);

    memcpy(buf, good, size);
    int32_t neg = -8;
    memcpy(buf + offsetof(CheckpointHeader, ch), &neg, 4);
    snprintf(bad, sizeof bad, OUT "/badheader.ckpt");
    write_bytes(bad, buf, size);
    expect_die("checkpoint header with an invalid config (ch -8)", ckpt_open_child, &a, bad);

    snprintf(bad, sizeof bad, OUT "/empty.ckpt");
    write_bytes(bad, good, 0);
    expect_die("checkpoint empty file", ckpt_open_child, &a, bad);

    snprintf(bad, sizeof bad, OUT "/missing.ckpt");
    expect_die("checkpoint missing file", ckpt_load_child, &a, bad);

    Config other = c;
    other.ch = 12;
    Trainer tr3;
    trainer_init(&tr3, &other, &PAPER_OBJECTIVE, 2, 1, SCHEDULE_LINEAR, &PAPER_HYPER, 1);
    CkptArgs m = {&tr3, path};
    expect_die("checkpoint into a network of another config (n_params)", ckpt_load_child, &m, path);
    trainer_free(&tr3);

    // a failed save returns -1 with a message and touches nothing else
    const char* nowhere = OUT "/no/such/folder/ck.ckpt";
    err[0] = 0;
    rc = checkpoint_save(&tr, SCHEDULE_LINEAR, nowhere, err, sizeof err);
    check("checkpoint_save into a missing folder returns -1 with a message", rc == -1 && strstr(err, nowhere),
          "rc %d, \"%s\"", rc, err);
    check("checkpoint_save failure leaves the good checkpoint untouched", same_bytes(path, good, size), "%s", path);

    // saving over a checkpoint in a read-only folder must fail and keep the old file
    const char* ro = OUT "/ro";
    const char* ro_path = OUT "/ro/ck.ckpt";
    mkdir_or_die(ro);
    rc = checkpoint_save(&tr2, SCHEDULE_LINEAR, ro_path, err, sizeof err);
    size_t ro_size = 0;
    uint8_t* ro_good = read_bytes(ro_path, &ro_size);
    chmod(ro, 0555);
    int probe = open(OUT "/ro/probe", O_CREAT | O_WRONLY, 0644);
    if (probe >= 0) {
        close(probe);
        unlink(OUT "/ro/probe");
        note("checkpoint_save into a read-only folder: skipped, chmod 0555 does not stop writes here (running as root?)");
    } else {
        train_step(&tr2, noise_data(&tr2.net.cfg));   // something new to save
        err[0] = 0;
        int rc2 = checkpoint_save(&tr2, SCHEDULE_LINEAR, ro_path, err, sizeof err);
        check("checkpoint_save into a read-only folder fails, old file intact",
              rc == 0 && rc2 == -1 && strstr(err, ro_path) && ro_good && same_bytes(ro_path, ro_good, ro_size) &&
              !exists(OUT "/ro/ck.ckpt.tmp"), "rc %d, \"%s\"", rc2, err);
    }
    chmod(ro, 0755);
    free(ro_good);
    free(good);
    free(buf);
    trainer_free(&tr);
    trainer_free(&tr2);
}

// ----------------------------------------------------------------------------
// 20. .npy files

static void check_npy(const char* name, const char* path, const float* data, size_t count, const char* shape) {
    size_t n = 0;
    uint8_t* f = read_bytes(path, &n);
    int ok = f && n >= 10 && !memcmp(f, "\x93NUMPY\x01\x00", 8);
    size_t hl = ok ? (size_t)(f[8] | f[9] << 8) : 0;
    char header[512] = "";
    if (ok && 10 + hl <= n && hl < sizeof header) memcpy(header, f + 10, hl);
    int aligned = ok && (10 + hl) % 64 == 0;
    int fields = strstr(header, "'descr': '<f4'") && strstr(header, "'fortran_order': False") &&
                 strstr(header, shape) && hl > 0 && header[hl - 1] == '\n';
    int data_ok = ok && n == 10 + hl + count * 4 && !memcmp(f + 10 + hl, data, count * 4);
    char tmp[256];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    check(name, ok && aligned && fields && data_ok && !exists(tmp),
          "magic %d, data at %zu (multiple of 64: %d), dict has %s: %d, data %d", ok, 10 + hl, aligned, shape, fields, data_ok);
    free(f);
}

static void test_npy(void) {
    float a[30];
    for (int i = 0; i < 30; i++) a[i] = i * 0.5f - 3;
    int shape3[3] = {2, 3, 5}, shape1[1] = {7};
    int r1 = save_npy(OUT "/a.npy", a, 3, shape3);
    int r2 = save_npy(OUT "/b.npy", a, 1, shape1);
    check("save_npy returns 0", r1 == 0 && r2 == 0, "%d %d", r1, r2);
    check_npy("save_npy (2, 3, 5): header, alignment, data", OUT "/a.npy", a, 30, "'shape': (2, 3, 5)");
    check_npy("save_npy (7,): one-element tuple", OUT "/b.npy", a, 7, "'shape': (7,)");
    // NumPy itself, when it is installed
    if (system("/usr/bin/python3 -c 'import numpy' >/dev/null 2>&1") == 0) {
        int rc = system("/usr/bin/python3 -c \"import numpy as np, sys; a = np.load('" OUT "/a.npy'); "
                        "b = np.load('" OUT "/b.npy'); "
                        "sys.exit(0 if a.shape == (2, 3, 5) and a.dtype == np.float32 and "
                        "(a.ravel() == np.arange(30) * 0.5 - 3).all() and b.shape == (7,) else 1)\"");
        check("save_npy readable by numpy.load", rc == 0, "shape, dtype and values");
    } else {
        note("save_npy via numpy.load: skipped, /usr/bin/python3 has no numpy");
    }
}

// ----------------------------------------------------------------------------

// ----------------------------------------------------------------------------
// 10.1-10.3, 11: fewer steps, DDIM, the per-t bound, reconstructions, interpolations

// A network of tiny_config with non-official random weights, so that eps_theta is far
// from 0 and depends on x_t and t (the official init's output conv would make it ~0).
static void random_net(UNet* m, int in_ch, int B_max, uint64_t seed) {
    Config c = tiny_config(in_ch, 0.0f);
    unet_build(m, &c, B_max);
    Rng rng;
    rng_seed(&rng, seed);
    unet_random_params(m, &rng);
}

static void test_respace(void) {
    const int T = 1000;
    Schedule s;
    schedule_init(&s, T, SCHEDULE_LINEAR);
    // alpha_bar in long double, from the betas of §4 recomputed here
    long double abar[1000], a = 1;
    for (int i = 0; i < T; i++) {
        a *= 1 - (1e-4L + (0.02L - 1e-4L) * i / (T - 1));
        abar[i] = a;
    }
    const int Ks[5] = {1, 2, 10, 250, 999};
    for (int k = 0; k < 5; k++) {
        int K = Ks[k];
        Schedule r;
        schedule_respace(&r, &s, K, 0);
        int map_ok = r.T == K;
        double worst_beta = 0, worst_abar = 0;
        long double prev = 1;
        for (int i = 0; i < K && map_ok; i++) {
            // tau_i = 1 + round((i - 1)(T - 1)/(K - 1)), 1-based i; tau_1 = T for K = 1
            int tau = K == 1 ? T - 1 : (int)lroundl((long double)i * (T - 1) / (K - 1));
            map_ok &= r.t_model[i] == tau;
            long double want = 1 - abar[tau] / prev;   // beta'_i = 1 - abar_tau_i / abar_tau_{i-1}
            worst_beta = fmax(worst_beta, (double)fabsl((r.betas[i] - want) / want));
            worst_abar = fmax(worst_abar, (double)fabsl((r.alphas_cumprod[i] - abar[tau]) / abar[tau]));
            prev = abar[tau];
        }
        check("respace: tau_i and beta'_i = 1 - abar_tau_i / abar_tau_{i-1} (Nichol & Dhariwal §4)",
              map_ok && worst_beta < 1e-9 && worst_abar < 1e-9,
              "K = %d: steps %s, worst relative error beta' %.2e, abar' %.2e (pass < 1e-9); first/last tau %d, %d",
              K, map_ok ? "as computed here" : "DIFFER", worst_beta, worst_abar, r.t_model[0] + 1, r.t_model[K - 1] + 1);
        schedule_free(&r);
    }
    Schedule r;
    schedule_respace(&r, &s, T, 0);
    int same = !memcmp(r.buffer, s.buffer, 12 * (size_t)T * sizeof(double) + (size_t)T * sizeof(int));
    check("respace: K = T is the trained schedule, bit for bit", same, "all 12 tables and t_model");
    schedule_free(&r);
    schedule_free(&s);
}

static void test_fewer_steps_sampling(void) {
    Schedule s, r;
    schedule_init(&s, 1000, SCHEDULE_LINEAR);
    UNet m;
    random_net(&m, 1, 2, 31);
    size_t n = 64;   // 1 x 8 x 8
    float* a = fmalloc(2 * n);
    float* b = fmalloc(2 * n);
    Rng rng;
    Sampler ddpm = {MEAN_EPS, VAR_FIXEDLARGE, 0, 0};
    Chain sb;
    chain_init(&sb, 2, n, NULL);
    float* xT = randn(2 * n, 1);

    // K = T through the respaced schedule: Algorithm 2's bits. The chain's last 40 steps
    // here (the ARM64 run is under qemu); tests/test_e2e.sh compares all 1000 through ./ddpm.
    schedule_respace(&r, &s, 1000, 0);
    memcpy(a, xT, 2 * n * sizeof(float));
    memcpy(b, xT, 2 * n * sizeof(float));
    rng_seed(&rng, 5);
    reverse_chain(&m, &s, &ddpm, a, 2, 39, &sb, &rng);
    rng_seed(&rng, 5);
    reverse_chain(&m, &r, &ddpm, b, 2, 39, &sb, &rng);
    int finite = all_finite(a, 2 * n);
    check("sample --steps 1000 = Algorithm 2, bit for bit", finite && !memcmp(a, b, 2 * n * sizeof(float)),
          "2 images, random weights, t = 40 ... 1; max |difference| %.3g", max_abs_diff(a, b, 2 * n));
    schedule_free(&r);

    // DDIM with eta = 0: x_0 is a function of x_T; the RNG after x_T does not matter
    schedule_respace(&r, &s, 10, 0);
    Sampler ddim0 = {MEAN_EPS, VAR_FIXEDLARGE, 1, 0.0}, ddim_half = {MEAN_EPS, VAR_FIXEDLARGE, 1, 0.5};
    const Sampler* runs[2] = {&ddim0, &ddim_half};
    int det = 0;
    for (int k = 0; k < 2; k++) {   // the same x_T, two RNG seeds after it
        memcpy(a, xT, 2 * n * sizeof(float));
        memcpy(b, xT, 2 * n * sizeof(float));
        rng_seed(&rng, 1);
        reverse_chain(&m, &r, runs[k], a, 2, r.T - 1, &sb, &rng);
        rng_seed(&rng, 2);
        reverse_chain(&m, &r, runs[k], b, 2, r.T - 1, &sb, &rng);
        if (k == 0) det = !memcmp(a, b, 2 * n * sizeof(float));
    }
    double spread = max_abs_diff(a, b, 2 * n);
    check("DDIM eta = 0 is deterministic given x_T", det && spread > 1e-3,
          "10 steps, two RNG seeds after x_T: %s; control with eta = 0.5: max |difference| %.3f (> 1e-3)",
          det ? "same bits" : "DIFFER", spread);
    schedule_free(&r);

    // DDIM with eta = 1: sigma_t^2 = beta_tilde_t, and the step is Alg. 2's with sigma_t^2 = beta_tilde_t
    const int Ks[2] = {1000, 50};
    for (int k = 0; k < 2; k++) {
        schedule_respace(&r, &s, Ks[k], 0);
        double worst = 0;
        for (int t = 0; t < r.T; t++)
            worst = fmax(worst, fabs(ddim_sigma2(t, 1.0, &r) - r.posterior_variance[t]) / fmax(r.posterior_variance[t], 1e-300));
        check("DDIM eta = 1: sigma_t^2 (Song et al. Eq. 16) = beta_tilde_t (Eq. 7)", worst < 1e-9,
              "K = %d, worst relative difference %.2e over every t (pass < 1e-9)", Ks[k], worst);
        schedule_free(&r);
    }
    // and DPM-Solver++(2M)'s first step, with no history, is DDIM's with eta = 0 (10.2's
    // derivation; tests/reference.py checks whole chains against float64)
    Sampler ddim1 = {MEAN_EPS, VAR_FIXEDLARGE, 1, 1.0}, small = {MEAN_EPS, VAR_FIXEDSMALL, 0, 0};
    Sampler dpm = {MEAN_EPS, VAR_FIXEDLARGE, SAMPLER_DPM, 0};
    double worst = 0, worst_dpm = 0;
    int ts[3] = {999, 500, 3};
    for (int i = 0; i < 3; i++) {
        int t_idx[2] = {ts[i], ts[i]};
        float* x = randn(2 * n, 1);
        float* eps_theta = randn(2 * n, 0.5);
        for (int k = 0; k < 2; k++) {
            memcpy(a, x, 2 * n * sizeof(float));
            memcpy(b, x, 2 * n * sizeof(float));
            rng_seed(&rng, 9);
            if (k == 0) ddim_sample(a, eps_theta, t_idx, 2, n, &ddim1, &s, &sb, &rng);
            else sb.h_prev = 0, dpm_solver_sample(a, eps_theta, t_idx, 2, n, &dpm, &s, &sb);
            rng_seed(&rng, 9);
            if (k == 0) p_sample(b, eps_theta, t_idx, 2, n, &small, &s, &sb, &rng);
            else ddim_sample(b, eps_theta, t_idx, 2, n, &ddim0, &s, &sb, &rng);
            *(k ? &worst_dpm : &worst) = fmax(k ? worst_dpm : worst, max_abs_diff(a, b, 2 * n));
        }
        free(x); free(eps_theta);
    }
    check("DDIM eta = 1, K = T: one step = Alg. 2's step with sigma_t^2 = beta_tilde_t", worst < 1e-4,
          "same x_t, eps_theta and z at t = 1000, 501, 4: max |difference| %.2e (pass < 1e-4)", worst);
    worst = worst_dpm;
    check("DPM-Solver++ without history: one step = DDIM's with eta = 0", worst < 1e-4,
          "same x_t and eps_theta at t = 1000, 501, 4: max |difference| %.2e (pass < 1e-4)", worst);
    int bad_K = 0, K_max = 0;
    for (int K = 1; K <= 1000; K += K < 20 ? 1 : 37) {   // distinct steps, rising, both ends kept
        schedule_respace(&r, &s, K, 1);
        int ok = r.t_model[K - 1] == 999 && (K == 1 || r.t_model[0] == 0);
        for (int i = 1; i < K; i++) ok &= r.t_model[i] > r.t_model[i - 1];
        if (!ok && !bad_K) bad_K = K;
        K_max = K;
        schedule_free(&r);
    }
    schedule_respace(&r, &s, 1000, 1);
    int all = 1;
    for (int t = 0; t < 1000; t++) all &= r.t_model[t] == t && r.betas[t] == s.betas[t];
    schedule_free(&r);
    check("log-SNR respacing: K distinct rising steps from t = 1 to T; K = T is the trained chain", !bad_K && all,
          "K = 1 ... %d: %s%d; K = 1000 %s", K_max, bad_K ? "first bad K = " : "bad: ", bad_K, all ? "equal" : "DIFFERS");
    chain_free(&sb);
    free(a); free(b); free(xT);
    unet_free(&m);
    schedule_free(&s);
}

// A dataset in memory: N images of C x H x W bytes with some structure.
static Dataset toy_dataset(int N, int C, int H, int W) {
    Dataset d;
    memset(&d, 0, sizeof d);
    snprintf(d.name, sizeof d.name, "toy");
    d.N = N; d.C = C; d.H = H; d.W = W;
    d.pixels = malloc_check((size_t)N * C * H * W, "toy");
    d.labels = calloc_check(N, 1, "toy");
    for (int i = 0; i < N; i++)
        for (int p = 0; p < C * H * W; p++) d.pixels[(size_t)i * C * H * W + p] = (uint8_t)((p * (i + 3) * 37) % 256);
    return d;
}

// On a 50-step chain (10.2) to keep the ARM64 run under qemu short: the identities hold
// for any chain. tests/test_e2e.sh checks the same on all 1000 steps through ./ddpm.
static void test_per_t(void) {
    Schedule full, s, r;
    schedule_init(&full, 1000, SCHEDULE_LINEAR);
    schedule_respace(&s, &full, 50, 0);
    const int T = 50;
    UNet m;
    random_net(&m, 1, 2, 41);
    Dataset d = toy_dataset(2, 1, 8, 8);
    double term[50], mse[50], rate[50];
    PerT pt = {term, mse};
    Rng rng;
    rng_seed(&rng, 3);
    BoundBpd plain = eval_bpd(&m, &s, &(Sampler){MEAN_EPS, VAR_FIXEDLARGE, 0, 0}, &d, 2, 0, &rng, NULL, NULL);
    rng_seed(&rng, 3);
    BoundBpd b = eval_bpd(&m, &s, &(Sampler){MEAN_EPS, VAR_FIXEDLARGE, 0, 0}, &d, 2, 0, &rng, &pt, NULL);
    double sum = b.prior;
    for (int t = 0; t < T; t++) sum += term[t];
    check("bpd --per-t: the terms and L_T sum to the total", fabs(sum - b.total) < 1e-9 * fabs(b.total) &&
          plain.total == b.total, "50 steps: sum %.9f, total %.9f; the same total without --per-t: %s",
          sum, b.total, plain.total == b.total ? "yes" : "NO");
    bound_rate(rate, term, b.prior, T);
    int mono = 1;
    for (int t = 0; t + 1 < T; t++) mono &= rate[t] >= rate[t + 1];
    check("bpd --per-t: rate(t) = L_T + sum_{s>t} L_{s-1}, falling in t; rate(1) + L_0 = total",
          mono && rate[T - 1] == b.prior && fabs(rate[0] + term[0] - b.total) < 1e-9 * fabs(b.total),
          "rate at t = 1000, 511, 1: %.6f %.6f %.6f; rate(1) + L_0 = %.9f, total %.9f", rate[T - 1], rate[T / 2],
          rate[0], rate[0] + term[0], b.total);
    check("bpd --per-t: distortion at t = 1 below distortion at t = T", sqrt(mse[0]) < sqrt(mse[T - 1]),
          "RMSE (0..255) %.2f at t = 1, %.2f at t = 1000", 127.5 * sqrt(mse[0]), 127.5 * sqrt(mse[T - 1]));
    schedule_respace(&r, &full, 20, 0);
    rng_seed(&rng, 3);
    BoundBpd b20 = eval_bpd(&m, &r, &(Sampler){MEAN_EPS, VAR_FIXEDLARGE, 0, 0}, &d, 2, 0, &rng, &pt, NULL);
    sum = b20.prior;
    for (int t = 0; t < 20; t++) sum += term[t];
    check("bpd --steps 20 --per-t: 20 terms sum to that chain's total", isfinite(b20.total) &&
          fabs(sum - b20.total) < 1e-9 * fabs(b20.total) && b20.total != b.total,
          "total %.6f (50 steps: %.6f)", b20.total, b.total);
    schedule_free(&r);
    dataset_free(&d);
    unet_free(&m);
    schedule_free(&s);
    schedule_free(&full);
}

// The bound's small fixture: a random 1-channel network on three 8x8 toy images, over the
// linear schedule respaced to 20 steps.
static void toy_bound(Schedule* full, Schedule* s, UNet* m, Dataset* d, int B_max, uint64_t seed) {
    schedule_init(full, 1000, SCHEDULE_LINEAR);
    schedule_respace(s, full, 20, 0);
    random_net(m, 1, B_max, seed);
    *d = toy_dataset(3, 1, 8, 8);
}

static void toy_bound_free(Schedule* full, Schedule* s, UNet* m, Dataset* d) {
    dataset_free(d);
    unet_free(m);
    schedule_free(s);
    schedule_free(full);
}

// The standard error bpd prints: with one image a batch, the images draw their noise in
// turn, so three one-image evaluations continue the same stream as one of all three.
static void test_bpd_std_err(void) {
    Schedule full, s;
    UNet m;
    Dataset d;
    toy_bound(&full, &s, &m, &d, 1, 43);
    Rng rng;
    rng_seed(&rng, 5);
    BoundBpd all = eval_bpd(&m, &s, &(Sampler){MEAN_EPS, VAR_FIXEDLARGE, 0, 0}, &d, 3, 0, &rng, NULL, NULL);
    rng_seed(&rng, 5);
    double L[3], mean = 0, var = 0;
    for (int i = 0; i < 3; i++) {
        Dataset one = d;
        one.N = 1;
        one.pixels = d.pixels + (size_t)i * 64;
        BoundBpd b = eval_bpd(&m, &s, &(Sampler){MEAN_EPS, VAR_FIXEDLARGE, 0, 0}, &one, 1, 0, &rng, NULL, NULL);
        L[i] = b.total;
        mean += L[i] / 3;
    }
    for (int i = 0; i < 3; i++) var += (L[i] - mean) * (L[i] - mean) / 2;
    double se = sqrt(var / 3);
    check("bpd: the standard error is that of the mean of the images' bounds",
          fabs(all.total - mean) < 1e-9 * mean && fabs(all.std_err - se) < 1e-6 * se && se > 0,
          "images %.6f %.6f %.6f: mean %.9f (bpd %.9f), std. error %.9f (bpd %.9f)",
          L[0], L[1], L[2], mean, all.total, se, all.std_err);
    toy_bound_free(&full, &s, &m, &d);
}

// bpd --t-samples: with K = T - 1 strata of one t each it is the full sum, bit for bit;
// with K = 4 strata its mean over repeated evaluations is the full bound's within four
// standard errors (without the stratum weights 1, 2, 6 and 10 it would be far off), and its
// spread is larger (it also samples t).
static void test_bpd_t_samples(void) {
    Schedule full, s;
    UNet m;
    Dataset d;
    toy_bound(&full, &s, &m, &d, 3, 47);
    Rng rng;
    rng_seed(&rng, 9);
    BoundBpd a = eval_bpd(&m, &s, &(Sampler){MEAN_EPS, VAR_FIXEDLARGE, 0, 0}, &d, 3, 0, &rng, NULL, NULL);
    rng_seed(&rng, 9);
    BoundBpd b = eval_bpd(&m, &s, &(Sampler){MEAN_EPS, VAR_FIXEDLARGE, 0, 0}, &d, 3, 19, &rng, NULL, NULL);
    check("bpd --t-samples T-1: every stratum one t, the full sum bit for bit",
          a.total == b.total && a.terms == b.terms && a.decoder == b.decoder && a.std_err == b.std_err,
          "full %.9f (s.e. %.9f), K = 19: %.9f (s.e. %.9f)", a.total, a.std_err, b.total, b.std_err);
    enum { R = 200 };
    double mf = 0, vf = 0, mk = 0, vk = 0;
    for (int r = 0; r < R; r++) {
        double f = eval_bpd(&m, &s, &(Sampler){MEAN_EPS, VAR_FIXEDLARGE, 0, 0}, &d, 3, 0, &rng, NULL, NULL).terms;
        double k = eval_bpd(&m, &s, &(Sampler){MEAN_EPS, VAR_FIXEDLARGE, 0, 0}, &d, 3, 4, &rng, NULL, NULL).terms;
        mf += f / R, vf += f * f / R, mk += k / R, vk += k * k / R;
    }
    vf = (vf - mf * mf) * R / (R - 1), vk = (vk - mk * mk) * R / (R - 1);
    double se = sqrt(vf / R + vk / R);
    check("bpd --t-samples 4: unbiased (mean within 4 std. errors of the full sum's), and noisier",
          fabs(mk - mf) < 4 * se && se < 0.1 * mf && vk > vf,
          "sum L_{t-1} over %d evaluations: full %.6f (sd %.6f), K = 4 %.6f (sd %.6f); std. error of the difference %.6f",
          R, mf, sqrt(vf), mk, sqrt(vk), se);
    toy_bound_free(&full, &s, &m, &d);
}

static void test_reconstruct_interpolate(void) {
    Schedule s;
    schedule_init(&s, 1000, SCHEDULE_LINEAR);
    UNet m;
    random_net(&m, 1, 4, 51);
    Dataset d = toy_dataset(2, 1, 8, 8);
    size_t n = 64;
    float xa[64], xb[64], x_t[64], rec_a[64], rec_b[64], xt_b[64], samples[4 * 64], inter[4 * 64];
    dataset_image(xa, &d, 0, 0);
    dataset_image(xb, &d, 1, 0);
    Sampler sp = {MEAN_EPS, VAR_FIXEDLARGE, 0, 0};
    Rng rng;

    // t = 1: one step of the chain from x_1, within a few levels of x_0 whatever the
    // network does (x0_hat = x_1 / sqrt(abar_1) - sqrt(1/abar_1 - 1) eps_theta, and
    // sqrt(1/abar_1 - 1) = 0.01: eps_theta of size 1 moves x0_hat by ~1.3 levels)
    rng_seed(&rng, 1);
    reconstruct(&m, &s, &sp, xa, 0, 4, x_t, samples, &rng, NULL);
    double se = 0;
    for (size_t i = 0; i < 4 * n; i++) se += (samples[i] - xa[i % n]) * (samples[i] - xa[i % n]);
    double rmse = 127.5 * sqrt(se / (4 * n));
    check("reconstruct at t = 1: within a few 0..255 levels of x_0", rmse < 4, "RMSE %.2f levels (pass < 4)", rmse);

    // t = 50: the k decodings of one x_t differ (t = T: tests/test_e2e.sh, through ./ddpm)
    rng_seed(&rng, 1);
    reconstruct(&m, &s, &sp, xa, 49, 4, x_t, samples, &rng, NULL);
    double spread = max_abs_diff(samples, samples + n, n);
    check("reconstruct at t = 50: the k samples differ", spread > 0.1, "max |sample 1 - sample 2| = %.3f", spread);

    // lambda = 0 and 1 are the reconstructions of A and B from the same noise
    const int t_idx = 30;
    rng_seed(&rng, 7);
    reconstruct(&m, &s, &sp, xa, t_idx, 1, x_t, rec_a, &rng, NULL);
    rng_seed(&rng, 7);
    reconstruct(&m, &s, &sp, xb, t_idx, 1, xt_b, rec_b, &rng, NULL);
    rng_seed(&rng, 7);
    interpolate(&m, &s, &sp, xa, xb, t_idx, 4, inter, &rng, NULL);
    double da = max_abs_diff(inter, rec_a, n), db = max_abs_diff(inter + 3 * n, rec_b, n);
    double mid = max_abs_diff(inter + n, rec_a, n);
    check("interpolate: lambda = 0 and 1 reproduce the reconstructions of A and B", da < 1e-4 && db < 1e-4 && mid > 0.01,
          "t = 31, same seed: max |difference| %.2e (A), %.2e (B) (pass < 1e-4); lambda = 1/3 differs from A by %.3f",
          da, db, mid);
    dataset_free(&d);
    unet_free(&m);
    schedule_free(&s);
}

// ----------------------------------------------------------------------------
// 4-6: Table 2's objectives: every loss's gradient with respect to the network's output

static const char* objective_name(const Objective* ob, char* buf, size_t len) {
    snprintf(buf, len, "--mean-type %s --var-type %s --loss %s", MEAN_NAMES[ob->mean], VAR_NAMES[ob->var],
             LOSS_NAMES[ob->loss]);
    return buf;
}

// Central differences of training_loss over every value of the output, for images at two
// steps. The loss is summed in double, the output perturbed by h (the step actually taken
// in float is used). Tolerance, relative to max |gradient|: 2e-3. The squared errors and
// the KLs are quadratic in the mean (no truncation error); what limits them is float's
// rounding of mean_p (~6e-8 |mean|) against the change of the mean, so h is chosen to
// move the mean by 1e-3 (d mean / d eps_theta is only ~0.01: h = 0.1 there). The decoder at
// t = 1 is nonlinear on the scale of sigma_1 ~ 0.01: there the mean moves by 2e-4
// (truncation (2e-4 / sigma)^2 ~ 4e-4, rounding 6e-8 / 2e-4 ~ 3e-4).
static void test_objective_gradients(void) {
    Schedule s;
    schedule_init(&s, 1000, SCHEDULE_LINEAR);
    const int B = 2;
    const size_t n = 24;
    const Objective obs[] = {
        {MEAN_EPS, VAR_FIXEDLARGE, LOSS_SIMPLE}, {MEAN_EPS, VAR_FIXEDLARGE, LOSS_MSE},
        {MEAN_MU, VAR_FIXEDLARGE, LOSS_MSE},     {MEAN_X0, VAR_FIXEDLARGE, LOSS_MSE},
        {MEAN_EPS, VAR_FIXEDLARGE, LOSS_KL},     {MEAN_EPS, VAR_FIXEDSMALL, LOSS_KL},
        {MEAN_EPS, VAR_LEARNED, LOSS_KL},        {MEAN_MU, VAR_FIXEDLARGE, LOSS_KL},
        {MEAN_MU, VAR_LEARNED, LOSS_KL},         {MEAN_X0, VAR_FIXEDSMALL, LOSS_KL},
        {MEAN_X0, VAR_LEARNED, LOSS_KL},
    };
    const int pairs[3][2] = {{0, 300}, {1, 999}, {0, 0}};
    float x0[2 * 24], eps[2 * 24], xt[2 * 24], work[4 * 24];
    float out[2 * 48], d_out[2 * 48];
    for (int i = 0; i < B * (int)n; i++) {
        // pixel values on the 0..255 grid, the two end bins included
        int v = i % 5 == 0 ? 0 : i % 5 == 1 ? 255 : rng_int(&trng, 256);
        x0[i] = v / 127.5f - 1.0f;
    }
    rng_normal(&trng, eps, B * n);
    for (size_t k = 0; k < sizeof obs / sizeof obs[0]; k++) {
        const Objective* ob = &obs[k];
        char name[128];
        objective_name(ob, name, sizeof name);
        for (int p = 0; p < 3; p++) {
            int t_idx[2] = {pairs[p][0], pairs[p][1]};
            q_sample(xt, x0, eps, t_idx, B, n, &s);
            size_t on = out_values(n, ob->var);
            // an output of the right kind, its mean off the target by about sigma_t (further,
            // and the decoder's bin mass would sit on its 1e-12 floor, where the loss is flat
            // and a difference quotient straddling the floor's edge means nothing)
            for (int b = 0; b < B; b++) {
                float mq[24];
                double lv;
                q_posterior_mean_variance(mq, NULL, &lv, x0 + b * n, xt + b * n, t_idx + b, 1, n, &s);
                float* o = out + b * on;
                for (size_t i = 0; i < n; i++) {
                    double r = 2 * rng_uniform(&trng) - 1;
                    o[i] = ob->mean == MEAN_EPS ? eps[b * n + i] + (float)r
                         : ob->mean == MEAN_X0 ? x0[b * n + i] + (float)(r * fmin(0.3, sqrt(s.betas[t_idx[b]]) / s.posterior_mean_coef1[t_idx[b]]))
                         : mq[i] + (float)(r * exp(0.5 * p_log_variance(t_idx[b], VAR_FIXEDLARGE, &s)));
                    if (ob->var == VAR_LEARNED)
                        o[n + i] = (float)(p_log_variance(t_idx[b], VAR_FIXEDLARGE, &s) + 0.5 * r);
                }
            }
            training_loss(d_out, out, x0, xt, eps, t_idx, B, n, ob, &s, work);
            double worst = 0, gmax = 0;
            for (size_t i = 0; i < B * on; i++) gmax = fmax(gmax, fabs(d_out[i]));
            for (size_t i = 0; i < B * on; i++) {
                int b = (int)(i / on), tb = t_idx[b];
                double c1 = s.posterior_mean_coef1[tb];
                double dmean = i % on >= n ? 1 : ob->mean == MEAN_MU ? 1 : ob->mean == MEAN_X0 ? c1
                             : c1 * s.sqrt_recipm1_alphas_cumprod[tb];   // |d mean / d output|
                float keep = out[i], h = (float)fmin(0.1, (tb == 0 ? 2e-4 : 1e-3) / dmean);
                out[i] = keep + h;
                float up = out[i];
                double lp = training_loss(NULL, out, x0, xt, eps, t_idx, B, n, ob, &s, work);
                out[i] = keep - h;
                float dn = out[i];
                double lm = training_loss(NULL, out, x0, xt, eps, t_idx, B, n, ob, &s, work);
                out[i] = keep;
                worst = fmax(worst, fabs((lp - lm) / ((double)up - dn) - d_out[i]));
            }
            check("objective gradient d loss / d output vs central differences", gmax > 0 && worst <= 2e-3 * gmax,
                  "%s, t = %d and %d: worst |error| %.2e, max |gradient| %.2e (pass <= 2e-3 x)", name,
                  t_idx[0] + 1, t_idx[1] + 1, worst, gmax);
        }
    }
    // the combinations that cannot be trained
    const Objective bad[] = {{MEAN_MU, VAR_FIXEDLARGE, LOSS_SIMPLE}, {MEAN_X0, VAR_FIXEDSMALL, LOSS_SIMPLE},
                             {MEAN_EPS, VAR_LEARNED, LOSS_MSE}, {MEAN_EPS, VAR_LEARNED, LOSS_SIMPLE}};
    int refused = 1;
    for (int k = 0; k < 4; k++) refused &= objective_check(&bad[k], NULL) != NULL;
    for (size_t k = 0; k < sizeof obs / sizeof obs[0]; k++) refused &= objective_check(&obs[k], NULL) == NULL;
    check("objective_check: simple needs eps, learned needs kl; the 11 trainable rows pass", refused, "4 refused");
    schedule_free(&s);
}

// The decoder's derivatives against central differences in double, on the bins of Eq. (13)
// including the two end bins and a tail far from the mean (the floor), and the KL's.
static void test_vb_term_derivatives(void) {
    double worst = 0;
    const double xs[5] = {-1.0, -1 + 2.0 / 255, 0.0039, 0.6, 1.0};
    const double means[4] = {-0.9, 0.0, 0.5, 1.05};
    const double lss[3] = {log(0.01), log(0.05), log(0.3)};
    for (int a = 0; a < 5; a++)
        for (int b = 0; b < 4; b++)
            for (int c = 0; c < 3; c++) {
                double dm, dls, h = 1e-6, x = xs[a], m = means[b], ls = lss[c];
                discretized_gaussian_log_likelihood(x, m, ls, &dm, &dls);
                double fm = (discretized_gaussian_log_likelihood(x, m + h, ls, NULL, NULL) -
                             discretized_gaussian_log_likelihood(x, m - h, ls, NULL, NULL)) / (2 * h);
                double fl = (discretized_gaussian_log_likelihood(x, m, ls + h, NULL, NULL) -
                             discretized_gaussian_log_likelihood(x, m, ls - h, NULL, NULL)) / (2 * h);
                worst = fmax(worst, fabs(dm - fm) / fmax(1, fabs(fm)));
                worst = fmax(worst, fabs(dls - fl) / fmax(1, fabs(fl)));
            }
    check("decoder (Eq. 13): d log p / d mean and d log p / d log sigma vs central differences", worst < 1e-5,
          "60 cases (end bins, centre, tails): worst relative error %.2e (pass < 1e-5)", worst);
}

// The kl training loss at (x_0, t, eps) is the term bpd reports for that t with the same
// draw. For --mean-type mu the mean does not go through the clipped x0_hat, so bpd's
// clipping cannot tell the two apart, and they must agree to rounding. On a 50-step chain
// (the loss reads any schedule) to keep the ARM64 run under qemu short.
static void test_kl_loss_is_the_bound_term(void) {
    Schedule full, s;
    schedule_init(&full, 1000, SCHEDULE_LINEAR);
    schedule_respace(&s, &full, 50, 0);
    const VarType vars[2] = {VAR_FIXEDLARGE, VAR_LEARNED};
    for (int v = 0; v < 2; v++) {
        Objective ob = {MEAN_MU, vars[v], LOSS_KL};
        Config c = tiny_config(1, 0.0f);
        c.learn_sigma = ob.var == VAR_LEARNED;
        UNet m;
        unet_build(&m, &c, 1);
        Rng rng;
        rng_seed(&rng, 61);
        unet_random_params(&m, &rng);
        Dataset d = toy_dataset(1, 1, 8, 8);
        double term[50], mse[50];
        PerT pt = {term, mse};
        rng_seed(&rng, 5);
        eval_bpd(&m, &s, &(Sampler){ob.mean, ob.var, 0, 0}, &d, 1, 0, &rng, &pt, NULL);
        // replay eval_bpd's draws: one eps per step, from the last step down
        size_t n = 64;
        float x0[64], eps[64], xt[64], work[4 * 64], d_out[128];
        dataset_image(x0, &d, 0, 0);
        rng_seed(&rng, 5);
        double worst = 0;
        int checked = 0;
        for (int t = s.T - 1; t >= 0; t--) {
            rng_normal(&rng, eps, n);
            if (t != 49 && t != 25 && t != 5 && t != 1 && t != 0) continue;
            q_sample(xt, x0, eps, &t, 1, n, &s);
            m.train = 0;
            const float* out = unet_forward(&m, xt, &s.t_model[t], 1);
            double loss = training_loss(d_out, out, x0, xt, eps, &t, 1, n, &ob, &s, work);
            worst = fmax(worst, fabs(loss - term[t]) / fmax(1e-12, fabs(term[t])));
            checked++;
        }
        check("--loss kl at (x_0, t, eps) = the term bpd reports for t", checked == 5 && worst < 1e-6,
              "--mean-type mu --var-type %s, 50 steps, t = 1000, 511, 103, 21, 1: worst relative difference %.2e "
              "(pass < 1e-6)", VAR_NAMES[ob.var], worst);
        dataset_free(&d);
        unet_free(&m);
    }
    schedule_free(&s);
    schedule_free(&full);
}

// A checkpoint keeps its objective, and its network the 2C-channel output of a learned Sigma.
static void test_objective_checkpoint(void) {
    Config c = tiny_config(1, 0.0f);
    Objective ob = {MEAN_X0, VAR_LEARNED, LOSS_KL};
    Trainer tr;
    trainer_init(&tr, &c, &ob, 2, 1, SCHEDULE_LINEAR, &PAPER_HYPER, 8);
    char err[4400];
    const char* path = OUT "/objective.ckpt";
    int rc = checkpoint_save(&tr, SCHEDULE_LINEAR, path, err, sizeof err);
    UNet m;
    Schedule sc;
    CheckpointHeader hd;
    load_ema_model(&m, &sc, &hd, path, 1);
    Objective got = objective_from_header(&hd);
    Config plain = c;
    size_t fixed = unet_count_params(&plain), learned = tr.net.n_params;
    int ok = rc == 0 && !memcmp(&got, &ob, sizeof ob) && m.cfg.learn_sigma == 1 && m.n_params == learned &&
             learned == fixed + (size_t)9 * c.ch * c.in_ch + c.in_ch;
    check("checkpoint: the objective round-trips; a learned Sigma doubles conv_out's channels", ok,
          "x0 / learned / kl back as %s / %s / %s; %zu parameters (%zu with a fixed variance)",
          MEAN_NAMES[got.mean], VAR_NAMES[got.var], LOSS_NAMES[got.loss], learned, fixed);
    unet_free(&m);
    schedule_free(&sc);
    trainer_free(&tr);
}

int main(int argc, char** argv) {
    (void)argc;
    // Paths are relative to the repository root: when started as .../tests/test_ddpm,
    // go there whatever the working folder; otherwise stay where we are.
    char root[4096];
    snprintf(root, sizeof root, "%s", argv[0]);
    char* slash = strrchr(root, '/');
    if (slash) {
        *slash = 0;
        const char* dir = strrchr(root, '/') ? strrchr(root, '/') + 1 : root;
        if (!strcmp(dir, "tests") && (chdir(root) != 0 || chdir("..") != 0))
            die("test: cannot enter the folder of %s", argv[0]);
    }
    // The thread tests compare 1 and 2 threads; the kernels' buffers must be sized for 2
    // before anything calls layers_init, even on a one-core machine.
    if (get_threads() < 2) set_threads(2);
    layers_init();
    mkdir_or_die("tests/out");
    rm_rf(OUT);
    mkdir_or_die(OUT);
    rng_seed(&trng, 20200611);
    double t0 = now_seconds();
#ifdef DDPM_PLAIN
    note("built with -DDDPM_PLAIN: the network runs the reference layers of section 16; "
         "the fast-kernel checks are left out with Part III");
#else
    note("kernels built for %s: %d-float %s, %d registers; tiles conv %dx%d, wide %dx%d, small %dx%d, "
         "dweight %dx%d, gemm %dx%d", DDPM_ISA, VW, DDPM_SIMD ? "vectors" : "rows (no vector types)",
         VEC_REGS, CONV_MR, CONV_NR, CONV_MR_WIDE, CONV_NR_WIDE, CONV_MR, CONV_NR_SMALL, CONV_DW_K, CONV_DW_CO,
         GEMM_MR, GEMM_NR);
    {   // which tile each map gets (17.2): the tests below cover the one chosen here
        ConvGeom g4 = conv_geom(4, 4, 3, 1), g8 = conv_geom(8, 8, 3, 1);
        // 16-float vectors: the small tile at 4 x 4, the wide one at 8 x 8; narrower ones never
        // take the small tile there (NEON's wide 4 x 20 fits 4 x 4 exactly), and 8 x 8 the main
        // one (README, the tiles table)
        check("conv tiles: 4 x 4 and 8 x 8 maps get the tile that computes the fewest pixels",
              VW == 16 ? g4.nr == CONV_NR_SMALL && g8.nr == CONV_NR_WIDE
                       : g4.nr != CONV_NR_SMALL && round_up(g4.L, g4.nr) <= round_up(g4.L, CONV_NR) && g8.nr == CONV_NR,
              "4 x 4: %d pixels a tile, 8 x 8: %d", g4.nr, g8.nr);
    }
#endif

    test_schedule_linear();
    test_schedule_cosine();
    test_q_sample_monte_carlo();
    test_posterior_bayes();
    test_reverse_process();
    test_normal_kl();
    test_discretized_decoder();
    test_prior_bpd();
    test_l_simple();
    test_conv(3, 1, 1);
    test_conv(1, 1, 0);
    test_conv(3, 2, 0);
    test_groupnorm();
    test_silu();
    test_linear();
    test_attention();
    test_upsample_conv();
    test_small_layers();
    test_dropout();
#ifndef DDPM_PLAIN
    test_conv_vs_ref(3, 1, 3, 13, 40, 9, 7);
    test_conv_vs_ref(1, 1, 2, 22, 35, 5, 11);
    test_conv_vs_ref(1, 1, 2, 17, 9, 8, 8);
    test_conv_vs_ref(3, 1, 1, 64, 64, 32, 32);
    test_conv_vs_ref(3, 1, 2, 13, 10, 8, 8);     // the 4 x 80 tile, its last rows partial
    test_conv_vs_ref(1, 1, 2, 17, 9, 15, 10);    // 4 x 80 on a plain 1x1, last tile moved back
    test_conv_vs_ref(3, 1, 2, 3, 3, 7, 13);      // 4-row tiles for <= 4 channels (conv_out; d input)
    test_conv_vs_ref(3, 2, 2, 13, 10, 8, 12);    // stride 2: phase grids, col2im input gradient
    test_conv_vs_ref(3, 2, 3, 5, 7, 6, 10);
    test_conv_vs_ref(3, 1, 2, 3, 500, 71, 30);   // dweight in bands of rows (dy over CONV_DW_SWEEP), the last one short
    test_conv_vs_ref(3, 1, 3, 20, 13, 4, 4);     // 4 x 4: the small tile (AVX-512), 13 rows = a panel and 5
    test_conv_vs_ref(1, 1, 2, 24, 9, 4, 4);      // a 1x1 on 4 x 4 (the grid's centre)
    test_conv_vs_ref(3, 2, 2, 11, 17, 8, 8);     // stride 2 onto 4 x 4
    for (int m = 4; m >= 2; m -= 2) {
        test_wino_vs_ref(m, 2, 13, 40, 9, 7);       // odd sides: partial tiles; channels not a vector's
        test_wino_vs_ref(m, 3, 3, 3, 7, 13);        // few channels
        test_wino_vs_ref(m, 1, 64, 64, 32, 32);     // a batch of one
        test_wino_vs_ref(m, 1, 20, 13, 5, 5);
        test_wino_vs_ref(m, 3, 20, 13, 4, 4);       // one tile an image (F(4x4))
        test_wino_vs_ref(m, 3, 5, 9, 64, 40);       // chunks of tiles, the last one short
        test_wino_vs_ref(m, 2, 130, 70, 8, 8);      // channels past the 64 of a filter block
    }
    // F(4x4) rounds about 10 times more than the direct conv: had the forced tile fallen
    // back to the direct conv, its errors would be the direct conv's
    check("Winograd's largest relative errors above, F(4x4) and F(2x2): F(4x4)'s past twice the direct conv's",
          wino_worst[4] > 2 * direct_worst && wino_dw_worst[4] > 2 * direct_worst,
          "%.2g and %.2g of sum |terms|, d weight %.2g and %.2g (tolerances 1.6e-4, 2.7e-5); the direct conv's %.2g",
          wino_worst[4], wino_worst[2], wino_dw_worst[4], wino_dw_worst[2], direct_worst);
    test_conv_input_vs_ref(2, 8, 11, 7, 9, 2);
    test_conv_input_vs_ref(3, 12, 3, 8, 8, 4);   // conv_out's 3 channels, the wide tile on 8 x 8
    wino_force = 4;
    test_conv_input_vs_ref(2, 8, 11, 7, 9, 2);   // Winograd reading the kept grids
    wino_force = 0;
    test_upsample_conv_vs_ref(2, 5, 11, 3, 5);
    test_upsample_conv_vs_ref(2, 32, 40, 8, 8);
    test_upsample_conv_vs_ref(3, 24, 13, 4, 4);  // the four phases on a 4 x 4 map
    test_conv_threads(3, 1);
    test_conv_threads(1, 1);
    test_conv_threads(3, 2);
    test_groupnorm_vs_ref();
    test_exp_approx();
    test_denormals();
    test_matmul();
#else
    note("skipped the fast-vs-reference, thread and matmul checks: they test Part III");
#endif
    test_timestep_embedding();
    test_config();
    test_unet_init();
    test_unet_determinism();
    test_unet_gradient();
    test_vb_term_derivatives();
    test_objective_gradients();
    test_kl_loss_is_the_bound_term();
    test_objective_checkpoint();
    test_respace();
    test_fewer_steps_sampling();
    test_per_t();
    test_bpd_std_err();
    test_bpd_t_samples();
    test_reconstruct_interpolate();
    test_first_multiplier();
    test_cifar10();
    test_fashion_mnist();
    test_checkpoints();
    test_nonfinite_and_links();
    test_resealed_headers();
    test_npy();

    rm_rf(OUT);
    printf("(%.1f s, %d threads)\n", now_seconds() - t0, get_threads());
    printf("%d passed, %d failed\n", n_passed, n_failed);
    return n_failed ? 1 : 0;
}
