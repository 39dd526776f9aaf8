// The checks of `make exercise-check` (tests/exercise.py): the unit suite's Part I checks,
// one group per exercise function, run as `check NAME` beside the student's copy
// (exercise/tests/, next to exercise/ddpm.c). A group calls its own function and the
// schedule only, but p_sample, which calls two others (the grader waits for them first).
#define main unit_main
#include "test_ddpm.c"
#undef main

// Eq. (15): x_0 from x_t and eps, with x_t made here in double (not by q_sample).
static void check_predict_x0_from_eps(void) {
    const int B = 4, n = 1000;
    Schedule s;
    schedule_init(&s, 1000, SCHEDULE_LINEAR);
    int t_idx[4] = {0, 100, 500, 999};
    float *x0 = fmalloc(B * n), *eps = randn(B * n, 1), *xt = fmalloc(B * n), *x0_hat = fmalloc(B * n);
    for (int b = 0; b < B; b++)
        for (int i = b * n; i < (b + 1) * n; i++) {
            x0[i] = (float)(2 * rng_uniform(&trng) - 1);
            xt[i] = (float)(sqrt(s.alphas_cumprod[t_idx[b]]) * x0[i] + sqrt(1 - s.alphas_cumprod[t_idx[b]]) * eps[i]);
        }
    predict_x0_from_eps(x0_hat, xt, eps, t_idx, B, n, &s);
    double worst = 0;   // x_t's rounding (u |x_t|), amplified by sqrt(1/abar_t), and the products' own
    int at = 0;
    for (int b = 0; b < B; b++)
        for (int i = b * n; i < (b + 1) * n; i++) {
            double tol = 8 * U_F32 * s.sqrt_recip_alphas_cumprod[t_idx[b]] * (fabs(xt[i]) + 2 * fabs(eps[i]));
            if (!(fabs(x0_hat[i] - x0[i]) / tol <= worst)) worst = fabs(x0_hat[i] - x0[i]) / tol, at = i;
        }
    check("predict_x0_from_eps gives back x_0 (Eq. 15)", worst <= 1, "x0_hat[%d] = %.6g, x_0 = %.6g (t = %d)", at,
          x0_hat[at], x0[at], t_idx[at / n] + 1);
    free(x0); free(eps); free(xt); free(x0_hat);
    schedule_free(&s);
}

// Algorithm 2, line 4: x_{t-1} = mu_theta + sigma_t z, and mu_theta alone at t = 1; the
// same z drawn again from a copy of the RNG, mu and sigma from p_mean_variance.
static void check_p_sample(void) {
    const int B = 3, n = 500;
    Schedule s;
    schedule_init(&s, 1000, SCHEDULE_LINEAR);
    int t_idx[3] = {0, 10, 999};
    float *x = randn(B * n, 1), *out = randn(B * n, 1), *x_prev = fmalloc(B * n);
    float *mean = fmalloc(B * n), *log_var = fmalloc(B * n), *x0_hat = fmalloc(B * n), *z = fmalloc(B * n);
    memcpy(x_prev, x, B * n * sizeof(float));
    Sampler sp = {MEAN_EPS, VAR_FIXEDLARGE, 0, 0};
    Chain ch;
    chain_init(&ch, B, n, NULL);
    Rng rng = trng, again = trng;
    memcpy(ch.t_idx, t_idx, sizeof t_idx);
    p_sample(x_prev, out, t_idx, B, n, &sp, &s, &ch, &rng);
    p_mean_variance(mean, log_var, x0_hat, x, out, t_idx, B, n, MEAN_EPS, VAR_FIXEDLARGE, 1, &s);
    rng_normal(&again, z, (size_t)B * n);
    double worst = 0;
    int at = 0;
    for (int i = 0; i < B * n; i++) {
        double want = mean[i] + (t_idx[i / n] > 0 ? exp(0.5 * log_var[i]) * z[i] : 0);
        double d = fabs(x_prev[i] - want) / (4 * U_F32 * (fabs(mean[i]) + fabs(z[i])) + 1e-30);
        if (!(d <= worst)) worst = d, at = i;
    }
    double want = mean[at] + (t_idx[at / n] > 0 ? exp(0.5 * log_var[at]) * z[at] : 0);
    check("p_sample: x_{t-1} = mu_theta + sigma_t z, and mu_theta at t = 1 (Algorithm 2, line 4)", worst <= 1,
          "x_{t-1}[%d] = %.6g, want %.6g (t = %d)", at, x_prev[at], want, t_idx[at / n] + 1);
    chain_free(&ch);
    free(x); free(out); free(x_prev); free(mean); free(log_var); free(x0_hat); free(z);
    schedule_free(&s);
}

int main(int argc, char** argv) {
    static const struct { const char* name; void (*run)(void); } GROUPS[] = {
        {"q_sample", test_q_sample_monte_carlo}, {"q_posterior_mean_variance", test_posterior_bayes},
        {"predict_x0_from_eps", check_predict_x0_from_eps}, {"p_sample", check_p_sample},
        {"l_simple", test_l_simple}, {"normal_kl", test_normal_kl},
        {"discretized_gaussian_log_likelihood", test_discretized_decoder}, {"prior_bpd", test_prior_bpd},
    };
    rng_seed(&trng, 20200611);
    for (size_t i = 0; i < sizeof GROUPS / sizeof GROUPS[0]; i++)
        if (argc == 2 && !strcmp(argv[1], GROUPS[i].name)) {
            GROUPS[i].run();
            printf("%d passed, %d failed\n", n_passed, n_failed);
            return n_failed > 0;
        }
    fprintf(stderr, "usage: %s NAME (a function with checks: see tests/exercise_check.c)\n", argv[0]);
    return 2;
}
