/*
ddpm.c — Denoising Diffusion Probabilistic Models in one file of C.

    Ho, Jain, Abbeel. "Denoising Diffusion Probabilistic Models". NeurIPS 2020.
    arXiv:2006.11239. Equation, algorithm and figure numbers below are the paper's.

This file is meant to be read top to bottom beside the paper. It trains a DDPM on
CIFAR-10, Fashion-MNIST or a folder of your own pictures on a CPU and samples from it,
with nothing but C11, libm, OpenMP and three stb headers (image write, load, resize).
There is no autograd: every layer of the U-Net has a forward pass and a hand-written
backward pass next to it, and tests/ proves them against PyTorch.

Build and run:
    make && ./ddpm                       # train on CIFAR-10 (make fetches it into data/)
    ./ddpm --data fashion-mnist          # offline dataset (make fashion-mnist)
    ./ddpm --data DIR --img 64           # a folder of pictures, at 64x64 (make emoji: Twemoji)
    ./ddpm sample --checkpoint runs/cifar10-tiny/model.ckpt -n 64
    ./ddpm --help                        # every subcommand and flag
    make test                            # gradients vs PyTorch autograd, and more
    make debug                           # ./ddpm_debug: the reference layers at -O0 -g, for gdb

The file is a lecture in four parts. A first reading stops after Part II, and meets
nothing of Part IV on the way.

  Part I. The paper ............ what the diffusion model computes, and Algorithms 1 and 2
     1. The noise schedule ...... §2, §4: beta_t linear 1e-4..0.02, T = 1000 (and cosine)
     2. The forward process ..... Eq. (2), (4): q(x_t | x_0); Eq. (6)-(7): q(x_{t-1} | x_t, x_0)
     3. The reverse process ..... Eq. (1), (8)-(11): p_theta(x_{t-1} | x_t), eps-parameterisation
     4. The variational bound ... Eq. (3), (5): KL terms, L_T, and the decoder L_0 of Eq. (13)
     5. The training loss ....... Eq. (12), (14): L_simple and its gradient w.r.t. eps_theta
     6. Randomness .............. the one RNG that Algorithms 1 and 2 draw from
     7. The network, seen from outside: eps_theta(x_t, t) as Algorithms 1 and 2 call it
     8. The data batch .......... §3.3: images scaled to [-1, 1]; random flips
     9. Training, Alg. 1 ........ Adam, warmup, clipping, EMA (§4, Appendix B)
    10. Sampling, Alg. 2 ........ Fig. 6; fewer steps (respaced, DDIM); Figs. 7-9 (§4.3-4.4)
    11. Evaluation .............. the bound of Eq. (5) in bits/dim (Table 1), per t (Table 4)
  Part II. The network eps_theta (§4, Appendix B), from the whole down to its parts
    12. The U-Net's parts ....... parameters, layers, blocks, and the table of layers used
    13. eps_theta(x_t, t) ....... the U-Net forward and backward
    14. The blocks .............. ResBlock, AttnBlock, Downsample, Upsample
    15. The layout .............. presets, parameter tensors, one buffer per role
    16. The layers .............. plain reference implementations, forward beside backward
  Part III. Fast kernels (an appendix: skip it on a first reading)
    17. Vectors, the matrix multiplication, the direct convolution, and fused versions
        of the layers of 16; -DDDPM_PLAIN leaves all of Part III out
  Part IV. Plumbing
    18. Errors, memory, files ... one-line errors, the one atomic writer, progress, signals
    19. Datasets on disk ........ CIFAR-10 binary, Fashion-MNIST IDX, a folder of pictures
                                  decoded once into a mapped cache
    20. Checkpoints ............. checksummed, written atomically, bit-exact resume
    21. Pictures and files ...... PNG grids, .npy and .npz arrays, weights exchange files
    22. main .................... the command line: one table of options, --help from it
    23. Many machines ........... data-parallel training on several processes (`make mpi`)

Conventions
    Tensors are float32, NCHW: B images, C channels, H x W pixels.
    Timesteps: the paper counts t = 1..T. Arrays and the network use the official code's
    0-based index, t_idx = t - 1, so alpha_bar[t_idx] is the paper's alpha_bar_t and the
    network is fed t_idx (0..T-1). Every function below takes t_idx.
*/
#define _GNU_SOURCE   // M_PI and friends from math.h, plus POSIX (fsync, isatty, sigaction)
#include <errno.h>
#include <fcntl.h>
#include <float.h>
#include <limits.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#endif

// ============================================================================
// Part I. The paper
// ============================================================================

// Every failure a user can cause (a bad configuration, a missing file, a full disk) ends
// in one line that says what to do; the helpers that print it are plumbing (Part IV):
_Noreturn static void die(const char* fmt, ...);                      // print one line, exit 1
static void* malloc_check(size_t size, const char* what);             // malloc, or die naming `what`
static void* calloc_check(size_t n, size_t size, const char* what);   // zeroed, or die likewise

// ----------------------------------------------------------------------------
// 1. The noise schedule (§2, §4)
//
// The forward process adds Gaussian noise with variances beta_1..beta_T. §4 fixes
// T = 1000 and beta linear from 1e-4 to 0.02, "small relative to data scaled to
// [-1, 1]" and large enough that L_T = D_KL(q(x_T|x_0) || N(0, I)) ~ 1e-5 bits/dim.
// Everything the other sections need is precomputed here in double, with the
// names of the official implementation (diffusion_utils_2.py):
//   alpha_t = 1 - beta_t,    alpha_bar_t = prod_{s<=t} alpha_s          (§2)
//   beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) * beta_t   (Eq. 7)

typedef enum { SCHEDULE_LINEAR, SCHEDULE_COSINE } ScheduleKind;
static const char* const SCHEDULE_NAMES[] = {"linear", "cosine", NULL};

typedef struct {
    int T;
    double* betas;                          // beta_t
    double* alphas;                         // alpha_t = 1 - beta_t
    double* alphas_cumprod;                 // alpha_bar_t
    double* alphas_cumprod_prev;            // alpha_bar_{t-1}, with alpha_bar_0 = 1
    double* sqrt_alphas_cumprod;            // sqrt(alpha_bar_t)
    double* sqrt_one_minus_alphas_cumprod;  // sqrt(1 - alpha_bar_t)
    double* sqrt_recip_alphas_cumprod;      // sqrt(1 / alpha_bar_t)
    double* sqrt_recipm1_alphas_cumprod;    // sqrt(1 / alpha_bar_t - 1)
    double* posterior_variance;             // beta_tilde_t, Eq. (7)
    double* posterior_log_variance_clipped; // log beta_tilde_t, with beta_tilde_2 at t = 1
    double* posterior_mean_coef1;           // sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t)
    double* posterior_mean_coef2;           // sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)
    int* t_model;                           // the network's t_idx for step t_idx: itself, except on
                                            // a chain of fewer steps (section 10.2)
    double* buffer;                         // the one allocation behind all of the above
} Schedule;

// beta_t for t_idx = 0..T-1.
static void make_betas(double* betas, int T, ScheduleKind kind) {
    if (kind == SCHEDULE_LINEAR) {
        // §4: "linearly from beta_1 = 1e-4 to beta_T = 0.02"
        for (int i = 0; i < T; i++) betas[i] = 1e-4 + (0.02 - 1e-4) * i / (double)(T - 1);
    } else {
        // Nichol & Dhariwal 2021, Eq. (17): alpha_bar(t) = f(t)/f(0),
        // f(t) = cos^2(((t/T + s) / (1 + s)) pi/2), s = 0.008, and
        // beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}, clipped at 0.999 near t = T.
        const double s = 0.008;
        for (int i = 0; i < T; i++) {
            double f1 = cos(((double)i / T + s) / (1 + s) * M_PI / 2);
            double f2 = cos(((double)(i + 1) / T + s) / (1 + s) * M_PI / 2);
            double b = 1.0 - (f2 * f2) / (f1 * f1);
            betas[i] = b < 0.999 ? b : 0.999;
        }
    }
}

// One allocation for the twelve tables and t_model.
static void schedule_alloc(Schedule* s, int T) {
    s->T = T;
    double* p = s->buffer = malloc_check(12 * (size_t)T * sizeof(double) + (size_t)T * sizeof(int), "the schedule");
    double** fields[] = {&s->betas, &s->alphas, &s->alphas_cumprod, &s->alphas_cumprod_prev,
                         &s->sqrt_alphas_cumprod, &s->sqrt_one_minus_alphas_cumprod,
                         &s->sqrt_recip_alphas_cumprod, &s->sqrt_recipm1_alphas_cumprod,
                         &s->posterior_variance, &s->posterior_log_variance_clipped,
                         &s->posterior_mean_coef1, &s->posterior_mean_coef2};
    for (int f = 0; f < 12; f++) *fields[f] = p + (size_t)f * T;
    s->t_model = (int*)(p + 12 * (size_t)T);
    for (int i = 0; i < T; i++) s->t_model[i] = i;
}

// Everything else from s->betas.
static void schedule_derive(Schedule* s) {
    int T = s->T;
    double abar = 1.0;
    for (int i = 0; i < T; i++) {
        double beta = s->betas[i], abar_prev = abar;
        abar *= 1.0 - beta;
        s->alphas[i] = 1.0 - beta;
        s->alphas_cumprod[i] = abar;
        s->alphas_cumprod_prev[i] = abar_prev;
        s->sqrt_alphas_cumprod[i] = sqrt(abar);
        s->sqrt_one_minus_alphas_cumprod[i] = sqrt(1.0 - abar);
        s->sqrt_recip_alphas_cumprod[i] = sqrt(1.0 / abar);
        s->sqrt_recipm1_alphas_cumprod[i] = sqrt(1.0 / abar - 1.0);
        // Eq. (7)
        s->posterior_variance[i] = beta * (1.0 - abar_prev) / (1.0 - abar);
        s->posterior_mean_coef1[i] = beta * sqrt(abar_prev) / (1.0 - abar);
        s->posterior_mean_coef2[i] = (1.0 - abar_prev) * sqrt(1.0 - beta) / (1.0 - abar);
    }
    // beta_tilde_1 = 0 (alpha_bar_0 = 1 makes 1 - alpha_bar_{t-1} vanish), so its log is
    // -inf; like the official code, use beta_tilde_2 in its place for the log.
    for (int i = 0; i < T; i++)
        s->posterior_log_variance_clipped[i] = log(s->posterior_variance[i == 0 && T > 1 ? 1 : i]);
}

static void schedule_init(Schedule* s, int T, ScheduleKind kind) {
    schedule_alloc(s, T);
    make_betas(s->betas, T, kind);
    schedule_derive(s);
}

static void schedule_free(Schedule* s) { free(s->buffer); }

// ----------------------------------------------------------------------------
// 2. The forward process q (§2)
//
// Eq. (2): q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I). Composing Gaussians
// gives x_t in one jump from x_0, which is what makes training cheap (Alg. 1 needs no
// simulation of the chain):
//   Eq. (4): q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I), i.e.
//            x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps,  eps ~ N(0, I).
// All functions take a batch: B images of n = C*H*W values, and t_idx[b] per image.

static void q_sample(float* x_t, const float* x_0, const float* eps, const int* t_idx,
                     int B, size_t n, const Schedule* s) {
    for (int b = 0; b < B; b++) {
        float c0 = (float)s->sqrt_alphas_cumprod[t_idx[b]];
        float c1 = (float)s->sqrt_one_minus_alphas_cumprod[t_idx[b]];
        for (size_t i = b * n; i < (b + 1) * n; i++) x_t[i] = c0 * x_0[i] + c1 * eps[i];
    }
}

// Eq. (6)-(7): the forward process posterior, tractable when conditioned on x_0:
//   q(x_{t-1} | x_t, x_0) = N(mu_tilde_t, beta_tilde_t I),
//   mu_tilde_t = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) x_0
//              + sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) x_t.
// mean gets B*n values; var and log_var (may be NULL) one per image.
static void q_posterior_mean_variance(float* mean, double* var, double* log_var,
                                      const float* x_0, const float* x_t, const int* t_idx,
                                      int B, size_t n, const Schedule* s) {
    for (int b = 0; b < B; b++) {
        int ti = t_idx[b];
        float c1 = (float)s->posterior_mean_coef1[ti], c2 = (float)s->posterior_mean_coef2[ti];
        for (size_t i = b * n; i < (b + 1) * n; i++) mean[i] = c1 * x_0[i] + c2 * x_t[i];
        if (var) var[b] = s->posterior_variance[ti];
        if (log_var) log_var[b] = s->posterior_log_variance_clipped[ti];
    }
}

// Eq. (4) solved for x_0 (this is also Eq. (15), the x_0 estimate of §4.3):
//   x0_hat = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)
//          = sqrt(1/alpha_bar_t) x_t - sqrt(1/alpha_bar_t - 1) eps
static void predict_x0_from_eps(float* x_0, const float* x_t, const float* eps, const int* t_idx,
                                int B, size_t n, const Schedule* s) {
    for (int b = 0; b < B; b++) {
        float c0 = (float)s->sqrt_recip_alphas_cumprod[t_idx[b]];
        float c1 = (float)s->sqrt_recipm1_alphas_cumprod[t_idx[b]];
        for (size_t i = b * n; i < (b + 1) * n; i++) x_0[i] = c0 * x_t[i] - c1 * eps[i];
    }
}

// ----------------------------------------------------------------------------
// 3. The reverse process p_theta (§3.2)
//
// Eq. (1): p_theta(x_{t-1} | x_t) = N(mu_theta(x_t, t), Sigma_theta(x_t, t)). §3.2 sets
// Sigma_theta = sigma_t^2 I, untrained, with one of two choices that give "similar results":
//   sigma_t^2 = beta_t        (optimal for x_0 ~ N(0, I); the official "fixedlarge")
//   sigma_t^2 = beta_tilde_t  (optimal for x_0 deterministic; "fixedsmall")
// and parameterises the mean by a noise predictor eps_theta. Why eps: with sigma_t fixed,
// Eq. (8) makes each term of the bound a squared error between means,
//   L_{t-1} = E_q[ ||mu_tilde_t(x_t, x_0) - mu_theta(x_t, t)||^2 / (2 sigma_t^2) ] + C,
// and Eqs. (9)-(10) write x_0 through x_t and the noise (Eq. 4), which turns the target
// mu_tilde_t into 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alpha_bar_t) eps). So predict eps:
//   Eq. (11): mu_theta(x_t, t) = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_theta).
// Eq. (11) is exactly mu_tilde_t(x_t, x0_hat) with x0_hat from predict_x0_from_eps, which
// is how we compute it: that way x0_hat can be clipped to [-1, 1] first, as the official
// sampler does (the data lives there), and the unclipped path equals Eq. (11) to rounding.
//
// Table 2 compares eps with predicting mu_tilde directly (the network outputs mu_theta),
// and a fixed Sigma with a learned diagonal Sigma_theta (the output conv then has 2C
// channels: mean, then log sigma_t^2; the official `learned`). §3.2 also mentions
// predicting x_0 (the official `xstart`; the mean is then mu_tilde_t(x_t, x0_hat), Eq. 7),
// which it found to give worse samples early in training; Table 2 has no row for it.

typedef enum { MEAN_EPS, MEAN_MU, MEAN_X0 } MeanType;                 // what the network outputs
typedef enum { VAR_FIXEDLARGE, VAR_FIXEDSMALL, VAR_LEARNED } VarType;  // sigma_t^2: beta_t, beta_tilde_t, learned

// log sigma_t^2 for a fixed variance. For sigma_t^2 = beta_t the official code uses
// log(beta_tilde_2) at t = 1 rather than log(beta_1): only the decoder L_0 sees this
// value, and the larger variance gives it a better likelihood.
static double p_log_variance(int t_idx, VarType var, const Schedule* s) {
    if (var == VAR_FIXEDSMALL) return s->posterior_log_variance_clipped[t_idx];
    return t_idx == 0 && s->T > 1 ? log(s->posterior_variance[1]) : log(s->betas[t_idx]);
}

// Values per image in the network's output: the mean part, then a learned log variance.
static size_t out_values(size_t n, VarType var) { return var == VAR_LEARNED ? 2 * n : n; }

// mu_theta(x_t, t) and log sigma_t^2 for a batch, from the network's output `out`
// (B * out_values(n) values): mean, x0_hat and log_var get B*n values each (log_var may
// be NULL). x0_hat is the predicted x_0, clipped to [-1, 1] if clip is set; the mean
// follows the clipped x0_hat, except when the network outputs the mean itself.
static void p_mean_variance(float* mean, float* log_var, float* x0_hat, const float* x_t, const float* out,
                            const int* t_idx, int B, size_t n, MeanType mt, VarType var, int clip,
                            const Schedule* s) {
    size_t on = out_values(n, var);
    for (int b = 0; b < B; b++) {
        const float* o = out + b * on;
        float *mu = mean + b * n, *x0 = x0_hat + b * n;
        const float* xt = x_t + b * n;
        const int* ti = t_idx + b;   // this image's t_idx
        if (mt == MEAN_MU) {
            // Eq. (7) solved for x_0: x0_hat = (mu - coef2 x_t) / coef1 (coef1 = 1 at t = 1)
            float c1 = (float)s->posterior_mean_coef1[*ti], c2 = (float)s->posterior_mean_coef2[*ti];
            for (size_t i = 0; i < n; i++) { mu[i] = o[i]; x0[i] = (o[i] - c2 * xt[i]) / c1; }
        } else if (mt == MEAN_EPS) {
            predict_x0_from_eps(x0, xt, o, ti, 1, n, s);
        } else {
            memcpy(x0, o, n * sizeof(float));
        }
        if (clip)
            for (size_t i = 0; i < n; i++) x0[i] = fminf(1.0f, fmaxf(-1.0f, x0[i]));
        if (mt != MEAN_MU) q_posterior_mean_variance(mu, NULL, NULL, x0, xt, ti, 1, n, s);
        if (!log_var) continue;
        float lv = var == VAR_LEARNED ? 0.0f : (float)p_log_variance(*ti, var, s);
        for (size_t i = 0; i < n; i++) log_var[b * n + i] = var == VAR_LEARNED ? o[n + i] : lv;
    }
}

// ----------------------------------------------------------------------------
// 4. The variational bound (§2, §3.3)
//
// Eq. (3): E[-log p_theta(x_0)] <= L. Eq. (5) splits L into KLs between Gaussians:
//   L = D_KL(q(x_T|x_0) || p(x_T))                           L_T, no parameters
//     + sum_{t>1} D_KL(q(x_{t-1}|x_t,x_0) || p_theta(x_{t-1}|x_t))   L_{t-1}
//     - log p_theta(x_0 | x_1)                                L_0, the decoder, Eq. (13)
// All of them are reported in bits per dimension: nats / (C*H*W * ln 2).

// KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) for one dimension, in nats.
static double normal_kl(double mean1, double logvar1, double mean2, double logvar2) {
    double d = mean1 - mean2;
    return 0.5 * (-1.0 + logvar2 - logvar1 + exp(logvar1 - logvar2) + d * d * exp(-logvar2));
}

// The standard normal CDF, in double (erfc keeps the tails accurate), and its density.
static double std_normal_cdf(double x) { return 0.5 * erfc(-x / M_SQRT2); }
static double std_normal_pdf(double x) { return exp(-0.5 * x * x) / sqrt(2.0 * M_PI); }

// Eq. (13): the discrete decoder. Pixel values 0..255 are scaled to x in [-1, 1], so each
// sits in a bin of width 2/255; its probability under N(mean, sigma^2) is the Gaussian
// mass over the bin, the two end bins extended to -inf and +inf so that the 256
// probabilities sum to one:
//   p(x) = CDF((x + 1/255 - mean)/sigma) - CDF((x - 1/255 - mean)/sigma)
// Returns log p(x) in nats. The official code uses a tanh approximation of the CDF; we
// use the exact one. The 1e-12 floor matches it and keeps log() finite.
// With d_mean, d_log_scale (may be NULL) also the derivatives of log p(x): with u_+- =
// (x - mean +- 1/255)/sigma, dp/dmean = (pdf(u_-) - pdf(u_+))/sigma, dp/dlog sigma =
// u_- pdf(u_-) - u_+ pdf(u_+) (an end bin has no term on its open side); 0 on the floor.
static double discretized_gaussian_log_likelihood(double x, double mean, double log_scale,
                                                       double* d_mean, double* d_log_scale) {
    double inv_stdv = exp(-log_scale), centered = x - mean;
    double u_plus = inv_stdv * (centered + 1.0 / 255), u_min = inv_stdv * (centered - 1.0 / 255);
    int top = x > 0.999, bottom = x < -0.999;
    double cdf_plus = top ? 1.0 : std_normal_cdf(u_plus);
    double cdf_min = bottom ? 0.0 : std_normal_cdf(u_min);
    // far in a tail the difference of CDFs cancels: use the upper tail instead
    double prob = cdf_plus - cdf_min;
    if (top) prob = std_normal_cdf(-u_min);   // 1 - CDF(u_min)
    else if (centered > 0 && !bottom) prob = std_normal_cdf(-u_min) - std_normal_cdf(-u_plus);
    if (d_mean) {
        double p_plus = top ? 0.0 : std_normal_pdf(u_plus), p_min = bottom ? 0.0 : std_normal_pdf(u_min);
        int floored = !(prob > 1e-12);
        *d_mean = floored ? 0.0 : inv_stdv * (p_min - p_plus) / prob;
        *d_log_scale = floored ? 0.0 : (u_min * p_min - u_plus * p_plus) / prob;
    }
    return log(fmax(prob, 1e-12));
}

// L_T = D_KL(q(x_T | x_0) || N(0, I)) in bits/dim for one image of n values. It has no
// parameters; with the linear schedule it is ~1e-5 bits/dim (§4).
static double prior_bpd(const float* x_0, size_t n, const Schedule* s) {
    int last = s->T - 1;   // t_idx of t = T
    double kl = 0, m = s->sqrt_alphas_cumprod[last], lv = log(1.0 - s->alphas_cumprod[last]);
    for (size_t i = 0; i < n; i++) kl += normal_kl(m * x_0[i], lv, 0.0, 0.0);
    return kl / (n * M_LN2);
}

// One term of Eq. (5) for one image, in bits/dim:
//   t > 1:  L_{t-1} = D_KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t))
//   t = 1:  L_0 = -log p_theta(x_0 | x_1), Eq. (13)
// mean_q, mean_p are the two means (n values), logvar_q the posterior's log variance,
// logvar_p p_theta's (n values: a learned Sigma_theta is per pixel). d_mean, d_logvar
// (may be NULL) get the term's gradient with respect to mean_p and logvar_p, times scale:
// for t > 1 that of the KL (Eq. 8 when Sigma is fixed), with d = mean_q - mean_p,
//   d/dmean_p = -d / sigma_p^2,   d/dlogvar_p = (1 - sigma_q^2/sigma_p^2 - d^2/sigma_p^2) / 2,
// and for t = 1 the decoder's (log sigma = logvar / 2).
static double vb_term_bpd_grad(float* d_mean, float* d_logvar, double scale, const float* x_0,
                               const float* mean_q, double logvar_q, const float* mean_p,
                               const float* logvar_p, int t_idx, size_t n) {
    double nats = 0, k = scale / (n * M_LN2);
    for (size_t i = 0; i < n; i++) {
        double dm = 0, dlv = 0, lv = logvar_p[i];
        if (t_idx == 0) {
            double dls;
            nats -= discretized_gaussian_log_likelihood(x_0[i], mean_p[i], 0.5 * lv, &dm, &dls);
            dm = -dm;
            dlv = -0.5 * dls;
        } else {
            double d = (double)mean_q[i] - mean_p[i], inv = exp(-lv);
            nats += normal_kl(mean_q[i], logvar_q, mean_p[i], lv);
            dm = -d * inv;
            dlv = 0.5 * (1.0 - exp(logvar_q - lv) - d * d * inv);
        }
        if (d_mean) d_mean[i] = (float)(k * dm);
        if (d_logvar) d_logvar[i] = (float)(k * dlv);
    }
    return nats / (n * M_LN2);
}

static double vb_term_bpd(const float* x_0, const float* mean_q, double logvar_q, const float* mean_p,
                          const float* logvar_p, int t_idx, size_t n) {
    return vb_term_bpd_grad(NULL, NULL, 0, x_0, mean_q, logvar_q, mean_p, logvar_p, t_idx, n);
}

// ----------------------------------------------------------------------------
// 5. The training loss, Eq. (14), and the other objectives of Table 2
//
// With the eps-parameterisation, Eq. (11) in Eq. (8) gives Eq. (12): L_{t-1} - C is a squared
// error between the true noise and the predicted one, weighted by
// beta_t^2 / (2 sigma_t^2 alpha_t (1 - alpha_bar_t)). §3.4 drops the weight ("L_simple"), which
// trains better (Table 2):
//   Eq. (14): L_simple = E_{t, x_0, eps} || eps - eps_theta(sqrt(abar_t) x_0 + sqrt(1-abar_t) eps, t) ||^2
// We average over every pixel of every image in the batch (the official code's
// mean_flat followed by a batch mean), so
//   dL/d eps_theta = 2 (eps_theta - eps) / N, N = B*C*H*W.

static double l_simple(float* d_eps_theta, const float* eps_theta, const float* eps, size_t N) {
    double sum = 0;
    for (size_t i = 0; i < N; i++) {
        double d = (double)eps_theta[i] - eps[i];
        sum += d * d;
        if (d_eps_theta) d_eps_theta[i] = (float)(2.0 * d / N);
    }
    return sum / N;
}

// Table 2's rows train other objectives:
//   simple  Eq. (14); the network must output eps.
//   mse     the same unweighted squared error on whatever the network outputs: eps, x_0,
//           or mu_tilde_t(x_t, x_0) of Eq. (7) (Table 2's "||mu_tilde - mu_theta||^2").
//   kl      the true bound's term L_{t-1} (Eq. 5) for the drawn t, in bits/dim, unclipped,
//           as the official vb_terms_bpd; a learned Sigma_theta gets a gradient only here.
typedef enum { LOSS_SIMPLE, LOSS_MSE, LOSS_KL } LossType;
typedef struct { MeanType mean; VarType var; LossType loss; } Objective;
static const Objective PAPER_OBJECTIVE = {MEAN_EPS, VAR_FIXEDLARGE, LOSS_SIMPLE};

// Their names. The official code (diffusion_utils_2.py) calls the mean types `eps`,
// `xprev` (mu here) and `xstart` (x0 here), the variances `fixedlarge`, `fixedsmall` and
// `learned`, and the losses `mse` (simple here: on eps it is Eq. 14) and `kl`; its `mse`
// on another mean type is our mse.
static const char* const MEAN_NAMES[] = {"eps", "mu", "x0", NULL};
static const char* const VAR_NAMES[] = {"fixedlarge", "fixedsmall", "learned", NULL};
static const char* const LOSS_NAMES[] = {"simple", "mse", "kl", NULL};

// What a refusal calls the three choices: these words, or others the caller passes
// (Part IV passes the names of its flags).
typedef struct { const char *mean, *var, *loss; } ObjectiveWords;
static const ObjectiveWords OBJECTIVE_WORDS = {"mean type", "variance type", "loss"};

// NULL, or why the combination cannot be trained (one line; w may be NULL).
static const char* objective_check(const Objective* ob, const ObjectiveWords* w) {
    static char msg[256];
    if (!w) w = &OBJECTIVE_WORDS;
    if (ob->mean > MEAN_X0 || ob->var > VAR_LEARNED || ob->loss > LOSS_KL) return "unknown objective";
    if (ob->loss == LOSS_SIMPLE && ob->mean != MEAN_EPS)
        snprintf(msg, sizeof msg, "%s simple is Eq. (14), a loss on eps: it needs %s eps (use %s mse or kl)",
                 w->loss, w->mean, w->loss);
    else if (ob->var == VAR_LEARNED && ob->loss != LOSS_KL)
        snprintf(msg, sizeof msg, "%s learned needs %s kl: a squared error gives the variance no gradient",
                 w->var, w->loss);
    else
        return NULL;
    return msg;
}

// The loss of a batch (B images of n values at t_idx, the network's output `out`), and
// its gradient with respect to `out` in d_out (may be NULL). work holds 4 n floats.
static double training_loss(float* d_out, const float* out, const float* x_0, const float* x_t, const float* eps,
                           const int* t_idx, int B, size_t n, const Objective* ob, const Schedule* s, float* work) {
    if (ob->loss == LOSS_SIMPLE) return l_simple(d_out, out, eps, (size_t)B * n);
    size_t on = out_values(n, ob->var);
    float *target = work, *mean_p = work + n, *logvar_p = work + 2 * n, *x0_hat = work + 3 * n;
    double sum = 0;
    for (int b = 0; b < B; b++) {
        const int* ti = t_idx + b;   // this image's t_idx
        const float *o = out + b * on, *x0 = x_0 + b * n, *xt = x_t + b * n;
        float* d = d_out ? d_out + b * on : NULL;
        if (ob->loss == LOSS_MSE) {
            const float* want = ob->mean == MEAN_EPS ? eps + b * n : ob->mean == MEAN_X0 ? x0 : target;
            if (ob->mean == MEAN_MU) q_posterior_mean_variance(target, NULL, NULL, x0, xt, ti, 1, n, s);
            for (size_t i = 0; i < n; i++) {
                double e = (double)o[i] - want[i];
                sum += e * e;
                if (d) d[i] = (float)(2.0 * e / ((double)B * n));
            }
            continue;
        }
        // kl: the posterior of Eqs. (6)-(7) against p_theta, then the chain rule through the
        // mean: d mean / d out = -coef1 sqrt(1/abar - 1) for eps, coef1 for x_0, 1 for mu.
        double lv_q;
        q_posterior_mean_variance(target, NULL, &lv_q, x0, xt, ti, 1, n, s);
        p_mean_variance(mean_p, logvar_p, x0_hat, xt, o, ti, 1, n, ob->mean, ob->var, 0, s);
        float* d_logvar = d && ob->var == VAR_LEARNED ? d + n : NULL;   // a fixed variance has none
        sum += vb_term_bpd_grad(d, d_logvar, 1.0 / B, x0, target, lv_q, mean_p, logvar_p, *ti, n);
        if (!d) continue;
        float c1 = (float)s->posterior_mean_coef1[*ti];
        float dmean_dout = ob->mean == MEAN_MU ? 1.0f : ob->mean == MEAN_X0 ? c1 : -c1 * (float)s->sqrt_recipm1_alphas_cumprod[*ti];
        for (size_t i = 0; i < n; i++) d[i] *= dmean_dout;
    }
    return ob->loss == LOSS_MSE ? sum / ((double)B * n) : sum / B;
}

// ----------------------------------------------------------------------------
// 6. Randomness: the one RNG
//
// Alg. 1 draws x_0, t and eps (lines 2-4), Alg. 2 draws x_T and every z, and the network
// draws its initial weights and dropout masks. All of it (data order, t, eps, flips,
// dropout, sampling noise) comes from one random number generator, xoshiro256** (Blackman
// & Vigna) seeded through splitmix64, in a fixed order, so the same seed and flags give
// the same bits, and its 32-byte state goes into checkpoints so a resumed run continues
// the same stream.
typedef struct { uint64_t s[4]; } Rng;

static uint64_t splitmix64(uint64_t* x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static void rng_seed(Rng* r, uint64_t seed) {
    for (int i = 0; i < 4; i++) r->s[i] = splitmix64(&seed);
}

static uint64_t rotl64(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static uint64_t rng_u64(Rng* r) {
    uint64_t* s = r->s;
    uint64_t result = rotl64(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0]; s[3] ^= s[1]; s[1] ^= s[2]; s[0] ^= s[3];
    s[2] ^= t; s[3] = rotl64(s[3], 45);
    return result;
}

// uniform in [0, 1) with 53 random bits
static double rng_uniform(Rng* r) { return (rng_u64(r) >> 11) * 0x1.0p-53; }

// uniform integer in [0, n)
static int rng_int(Rng* r, int n) { return (int)(rng_uniform(r) * n); }

// n standard normals by Box-Muller, two per pair of uniforms (the last spare dropped).
// The uniforms come from the one stream in order, 2048 at a time; the log, sin and cos
// of each pair (the costly part) are then done by whichever thread: same bits.
static void rng_normal(Rng* r, float* out, size_t n) {
    enum { CHUNK = 2048 };   // values per chunk (even)
    double u[CHUNK];
    for (size_t i0 = 0; i0 < n; i0 += CHUNK) {
        int m = n - i0 < CHUNK ? (int)(n - i0) : CHUNK, pairs = (m + 1) / 2;
        for (int j = 0; j < 2 * pairs; j += 2) {
            u[j] = 1.0 - rng_uniform(r);   // in (0, 1]
            u[j + 1] = rng_uniform(r);
        }
        #pragma omp parallel for schedule(static) if (m > 256)
        for (int j = 0; j < pairs; j++) {
            double rad = sqrt(-2.0 * log(u[2 * j])), th = 2.0 * M_PI * u[2 * j + 1];
            out[i0 + 2 * j] = (float)(rad * cos(th));
            if (2 * j + 1 < m) out[i0 + 2 * j + 1] = (float)(rad * sin(th));
        }
    }
}

// A stateless hash for dropout masks: element i of a mask drawn with key k is
// decided by hash(k, i) alone, so masks can be made by many threads in any order
// and still be the same bits, and the backward pass can rebuild them. It is additive,
// hash(k, i + j) = hash(k + j golden, i), so the masks of images computed apart from the
// rest of their batch (section 14's block_dropout) are those of the whole batch.
#define GOLDEN 0x9e3779b97f4a7c15ULL
static uint32_t hash_u32(uint64_t key, uint64_t i) {
    uint64_t x = key + i * GOLDEN;
    return (uint32_t)(splitmix64(&x) >> 32);
}

// ----------------------------------------------------------------------------
// 7. The network, seen from outside: eps_theta(x_t, t)
//
// Algorithms 1 and 2 need the network only as a function: x_t and t in, the predicted
// noise eps_theta(x_t, t) out (the official code passes it around as `denoise_fn`),
// and, for training, the gradient of the loss with respect to its parameters. (For
// Table 2's other rows the same output is x_0 or mu_theta instead, plus log sigma_t^2
// for a learned variance: section 3.) What it is inside (§4: "a U-Net backbone similar
// to an unmasked PixelCNN++") is Part II. This section is all of it the diffusion code
// sees: its configuration, its parameter and gradient buffers, and six functions.
#define MAX_LEVELS 6

typedef struct {
    int in_ch;                     // image channels: 3 (CIFAR-10) or 1 (Fashion-MNIST)
    int img;                       // image side: 32 (a folder of pictures: 16 to 256)
    int ch;                        // base channel count
    int n_levels;                  // resolutions: 32, 16, 8, 4 for the paper
    int ch_mult[MAX_LEVELS];       // channels at level i: ch * ch_mult[i]
    int num_res_blocks;            // ResBlocks per level on the way down
    int n_attn;
    int attn_res[MAX_LEVELS];      // resolutions with self-attention: 16 (§4)
    int groups;                    // GroupNorm groups
    float dropout;                 // 0.1 on CIFAR-10 (Appendix B)
    int learn_sigma;               // 1: the output has 2 in_ch channels, the second half log sigma_t^2
} Config;

static int out_channels(const Config* c) { return c->learn_sigma ? 2 * c->in_ch : c->in_ch; }   // mean, log var

typedef struct UNetLayers UNetLayers;   // the layers, activations and scratch (section 12)

typedef struct {
    Config cfg;
    int B_max;                  // activations are sized for this many images
    size_t n_params;
    float* params;              // (n_params): every parameter of the network, one buffer
    float* grads;               // (n_params): their gradients, in the same layout
    int train;                  // dropout on (training) or off (sampling, evaluation)
    int no_grad;                // no backward pass follows (sampling, evaluation): the
                                // forward need not keep what only the backward reads
    uint64_t dropout_key;       // drawn from the RNG once per step
    int batch_start;            // these images' place in the step's batch: their dropout
                                // masks are the same wherever the batch is cut (section 14)
    UNetLayers* L;
} UNet;

// Builds the network for batches of up to B_max images; every buffer it will ever use
// is allocated here, once (dies with a one-line reason if cfg is unusable).
static void unet_build(UNet* m, const Config* cfg, int B_max);
static void unet_free(UNet* m);
// The official initialisation, drawn from rng.
static void unet_init(UNet* m, Rng* rng);
// x_t (B, in_ch, img, img), t_idx (B) -> eps_theta (B, out_channels, img, img), B <= B_max.
// The result lives in the network's activations until the next forward.
static float* unet_forward(UNet* m, const float* x_t, const int* t_idx, int B);
// d_eps_theta (B, out_channels, img, img), after unet_forward on the same batch -> m->grads,
// accumulated (+=): unet_zero_grad first.
static void unet_backward(UNet* m, const float* d_eps_theta, int B);
static void unet_zero_grad(UNet* m);

// ----------------------------------------------------------------------------
// 8. The data batch (§3.3, Appendix B)
//
// §3.3: "We assume that image data consists of integers in {0, 1, ..., 255} scaled
// linearly to [-1, 1]. This ensures that the neural network reverse process operates
// on consistently scaled inputs starting from the standard normal prior p(x_T)."
// Datasets stay as bytes (read from disk, or mapped from a folder's decoded cache, in
// section 19); a batch is scaled as it is drawn.

typedef struct {
    char name[32];
    int N, C, H, W;
    uint8_t* pixels;   // (N, C, H, W)
    uint8_t* labels;   // (N), 0..9; NULL for a folder of pictures
    size_t mapped;     // bytes of a mapped cache file the pixels lie in (section 19), or 0
} Dataset;

// Image i of the dataset as floats in [-1, 1] (§3.3), mirrored left-right if flip.
static void dataset_image(float* x, const Dataset* d, int i, int flip) {
    const uint8_t* p = d->pixels + (size_t)i * d->C * d->H * d->W;
    for (int c = 0; c < d->C; c++)
        for (int y = 0; y < d->H; y++)
            for (int xx = 0; xx < d->W; xx++) {
                int sx = flip ? d->W - 1 - xx : xx;
                x[((size_t)c * d->H + y) * d->W + xx] = p[((size_t)c * d->H + y) * d->W + sx] / 127.5f - 1.0f;
            }
}

// x_0 ~ q(x_0): B images drawn uniformly (with replacement), each flipped
// horizontally with probability 1/2 when flips are on (Appendix B: "random horizontal
// flips during training" on CIFAR-10).
static void dataset_batch(float* x0, const Dataset* d, int B, int flips, Rng* rng) {
    size_t n = (size_t)d->C * d->H * d->W;
    for (int b = 0; b < B; b++) {
        int i = rng_int(rng, d->N);
        int flip = flips && rng_uniform(rng) < 0.5;
        dataset_image(x0 + b * n, d, i, flip);
    }
}

// ----------------------------------------------------------------------------
// 9. Training: Algorithm 1 (§3.4, §4, Appendix B)
//
//   Algorithm 1 Training
//   1: repeat
//   2:   x_0 ~ q(x_0)
//   3:   t ~ Uniform({1, ..., T})
//   4:   eps ~ N(0, I)
//   5:   Take gradient descent step on grad_theta || eps - eps_theta(sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t) ||^2
//   6: until converged
//
// Appendix B's optimiser: Adam, learning rate 2e-4 (CIFAR-10), batch 128, and an
// exponential moving average of the parameters with decay 0.9999 for sampling. The
// official code adds a linear learning-rate warmup over 5000 steps and clips the
// global gradient norm at 1.0; we do the same.

typedef struct {
    float lr, beta1, beta2, adam_eps;   // Adam: 2e-4, 0.9, 0.999, 1e-8
    int warmup;                         // linear warmup steps: 5000
    float grad_clip;                    // global norm: 1.0
    float ema_decay;                    // 0.9999
    int flips;                          // random horizontal flips
} TrainHyper;

static const TrainHyper PAPER_HYPER = {2e-4f, 0.9f, 0.999f, 1e-8f, 5000, 1.0f, 0.9999f, 1};

// The images of a drawn batch are computed in slices of consecutive images, whose losses
// and gradients meet as their mean. Section 23 decides the slices; by default there is
// one, the whole batch:
typedef struct { int start, B; } Slice;   // images [start, start + B) of the batch
static int batch_slice(Slice* sl, int B, int K, int i);       // this process's i-th slice of K; 0 past the last
static double slices_mean_loss(double sum, int k);            // the mean of the k slices' means, over all
static void slices_mean_grads(float* g, size_t n, int k);     // the same for the gradient in g

// Everything a training run owns. params/grads live in the UNet; the optimiser's two
// moments and the EMA are one buffer each, in the same layout.
typedef struct {
    UNet net;
    Schedule sched;
    TrainHyper hyper;
    Objective obj;      // what the network predicts and the loss (sections 3, 5)
    float* adam_m;      // first moment
    float* adam_v;      // second moment
    float* ema;         // EMA of the parameters: what sampling and evaluation use
    uint64_t step;      // steps taken
    Rng rng;
    int B;              // the batch
    int K;              // computed in K slices of B/K images (micro-batches), one after another
    // per-step buffers, sized once
    float *x0, *eps, *x_t, *d_out, *loss_work;
    int* t_idx;
} Trainer;

// B = 0 builds the parameters and the optimizer's state alone, with no room for images:
// enough to write a checkpoint of weights trained elsewhere (2.8 GB for the 256x256
// network rather than 4.7).
static void trainer_init(Trainer* tr, const Config* cfg, const Objective* ob, int B, int K, ScheduleKind sk,
                         const TrainHyper* h, uint64_t seed) {
    memset(tr, 0, sizeof *tr);
    Config c = *cfg;
    c.learn_sigma = ob->var == VAR_LEARNED;
    int most = 0;   // the network is sized for the largest slice of the batch it computes
    Slice sl;
    for (int i = 0; batch_slice(&sl, B, K, i); i++) most = sl.B > most ? sl.B : most;
    unet_build(&tr->net, &c, most);
    schedule_init(&tr->sched, 1000, sk);
    tr->hyper = *h;
    tr->obj = *ob;
    tr->B = B;
    tr->K = K;
    size_t n = tr->net.n_params, n_img = (size_t)cfg->in_ch * cfg->img * cfg->img, img = B * n_img;
    tr->adam_m = calloc_check(n, sizeof(float), "Adam first moments");
    tr->adam_v = calloc_check(n, sizeof(float), "Adam second moments");
    tr->ema = malloc_check(n * sizeof(float), "EMA parameters");
    tr->x0 = malloc_check(img * sizeof(float), "x_0 batch");
    tr->eps = malloc_check(img * sizeof(float), "eps batch");
    tr->x_t = malloc_check(img * sizeof(float), "x_t batch");
    tr->d_out = malloc_check((size_t)most * n_img / c.in_ch * out_channels(&c) * sizeof(float), "loss gradient");
    tr->loss_work = malloc_check(n_img * 4 * sizeof(float), "loss buffers");
    tr->t_idx = malloc_check(B * sizeof(int), "timesteps");
    rng_seed(&tr->rng, seed);
    unet_init(&tr->net, &tr->rng);
    memcpy(tr->ema, tr->net.params, n * sizeof(float));
}

static void trainer_free(Trainer* tr) {
    unet_free(&tr->net);
    schedule_free(&tr->sched);
    free(tr->adam_m); free(tr->adam_v); free(tr->ema);
    free(tr->x0); free(tr->eps); free(tr->x_t); free(tr->d_out); free(tr->loss_work); free(tr->t_idx);
}

// The global L2 norm of the gradient, summed in double in a fixed order: 256 fixed
// chunks (threads take chunks; the chunk boundaries do not depend on the thread
// count), each in 8 lanes, then the chunk sums in order.
static double grad_global_norm(const float* g, size_t n) {
    enum { CHUNKS = 256, L = 8 };
    double part[CHUNKS];
    size_t len = (n + CHUNKS - 1) / CHUNKS;
    #pragma omp parallel for schedule(static)
    for (int c = 0; c < CHUNKS; c++) {
        size_t i = c * len, end = i + len < n ? i + len : n;
        double s[L] = {0};
        for (; i + L <= end; i += L)
            for (int l = 0; l < L; l++) s[l] += (double)g[i + l] * g[i + l];
        for (; i < end; i++) s[0] += (double)g[i] * g[i];
        part[c] = 0;
        for (int l = 0; l < L; l++) part[c] += s[l];
    }
    double total = 0;
    for (int c = 0; c < CHUNKS; c++) total += part[c];
    return sqrt(total);
}

// Adam (Kingma & Ba 2015) with bias correction, as TensorFlow's AdamOptimizer:
//   m = b1 m + (1 - b1) g,  v = b2 v + (1 - b2) g^2,
//   p -= lr sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)
static void adam_update(float* p, const float* g, float* m, float* v, size_t n, float lr,
                        float b1, float b2, float eps, uint64_t t, float grad_scale) {
    float lr_t = lr * (float)(sqrt(1.0 - pow(b2, (double)t)) / (1.0 - pow(b1, (double)t)));
    #pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) {
        float gi = g[i] * grad_scale;
        m[i] = b1 * m[i] + (1.0f - b1) * gi;
        v[i] = b2 * v[i] + (1.0f - b2) * gi * gi;
        p[i] -= lr_t * m[i] / (sqrtf(v[i]) + eps);
    }
}

// ema = d ema + (1 - d) p, with d = min(decay, (1 + step) / (10 + step)). Here ddpm.c departs
// from the official code, which uses a fixed 0.9999 from step 1 (tpu_utils.make_ema): over
// 800k steps the start does not matter. A CPU run is short: with a fixed 0.999, 22% of
// the EMA is still the random initial weights at step 1,500 (0.999^1500), and with
// 0.9999, 86%. The warm-up (TensorFlow's num_updates rule) lets the EMA follow
// the weights while they move fast; it reaches 0.999 at step 8,990, 0.9999 at 89,990.
static void ema_update(float* ema, const float* p, size_t n, float decay, uint64_t step) {
    float d = fminf(decay, (1.0f + step) / (10.0f + step));
    #pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) ema[i] = d * ema[i] + (1.0f - d) * p[i];
}

typedef struct { float loss, lr, grad_norm; } StepStats;

// Lines 2-4 of Alg. 1 for a whole batch: x_0, t (0-based: t_idx = t - 1), eps, and the
// dropout key, always drawn in this order so a seed fixes the whole run.
static void draw_batch(Trainer* tr, const Dataset* data) {
    int B = tr->B;
    size_t n = (size_t)tr->net.cfg.in_ch * tr->net.cfg.img * tr->net.cfg.img;
    dataset_batch(tr->x0, data, B, tr->hyper.flips, &tr->rng);
    for (int b = 0; b < B; b++) tr->t_idx[b] = rng_int(&tr->rng, tr->sched.T);
    rng_normal(&tr->rng, tr->eps, B * n);
    tr->net.dropout_key = rng_u64(&tr->rng);
}

// One step of Alg. 1 (line 5): the loss of Eq. (14) (or another row of Table 2), backprop,
// clip, Adam, EMA. The batch is computed in slices (batch_slice above): one slice, all of
// it, unless section 23 splits it; each slice's loss and gradient are its images' mean,
// and the step's are the mean over the slices.
static StepStats train_step(Trainer* tr, const Dataset* data) {
    UNet* m = &tr->net;
    const TrainHyper* h = &tr->hyper;
    size_t n = (size_t)m->cfg.in_ch * m->cfg.img * m->cfg.img;
    draw_batch(tr, data);                                              // lines 2-4
    m->train = 1;
    m->no_grad = 0;
    unet_zero_grad(m);
    double loss = 0;
    int k = 0;
    Slice sl;
    for (; batch_slice(&sl, tr->B, tr->K, k); k++) {
        float *x0 = tr->x0 + sl.start * n, *x_t = tr->x_t + sl.start * n, *eps = tr->eps + sl.start * n;
        int* t_idx = tr->t_idx + sl.start;
        q_sample(x_t, x0, eps, t_idx, sl.B, n, &tr->sched);            // Eq. (4)
        m->batch_start = sl.start;
        float* out = unet_forward(m, x_t, t_idx, sl.B);                // eps_theta
        loss += training_loss(tr->d_out, out, x0, x_t, eps, t_idx, sl.B, n, &tr->obj, &tr->sched,
                              tr->loss_work);                          // Eq. (14)
        unet_backward(m, tr->d_out, sl.B);                             // its gradient
    }
    StepStats st;
    st.loss = (float)slices_mean_loss(loss, k);
    if (!isfinite(st.loss)) return st;   // the caller stops; no parameter was updated
    slices_mean_grads(m->grads, m->n_params, k);
    st.grad_norm = (float)grad_global_norm(m->grads, m->n_params);
    float scale = st.grad_norm > h->grad_clip ? h->grad_clip / st.grad_norm : 1.0f;
    tr->step++;
    st.lr = h->warmup > 0 ? h->lr * fminf(1.0f, (float)tr->step / h->warmup) : h->lr;
    adam_update(m->params, m->grads, tr->adam_m, tr->adam_v, m->n_params, st.lr,
                h->beta1, h->beta2, h->adam_eps, tr->step, scale);
    ema_update(tr->ema, m->params, m->n_params, h->ema_decay, tr->step);
    return st;
}

// Algorithm 1 as a whole: "repeat ... until converged" is here until `steps` steps are
// taken, or the watcher stops it. The watcher (the command line's: the log, the progress
// line, previews, checkpoints, Ctrl-C and the clock) is told of every step.
typedef struct { int (*step)(void* ctx, const StepStats* st); void* ctx; } TrainWatch;

static void train(Trainer* tr, const Dataset* data, uint64_t steps, const TrainWatch* w) {
    while (tr->step < steps) {                                         // 1: repeat
        StepStats st = train_step(tr, data);                           // 2-5
        if (!w->step(w->ctx, &st)) return;                             // 6: until converged
    }
}

// ----------------------------------------------------------------------------
// 10. Sampling: Algorithm 2 (§3.2) and progressive generation (§4.3, Fig. 6)
//
//   Algorithm 2 Sampling
//   1: x_T ~ N(0, I)
//   2: for t = T, ..., 1 do
//   3:   z ~ N(0, I) if t > 1, else z = 0
//   4:   x_{t-1} = 1/sqrt(alpha_t) (x_t - (1 - alpha_t)/sqrt(1 - abar_t) eps_theta(x_t, t)) + sigma_t z
//   5: end for
//   6: return x_0
//
// Line 4 is mu_theta of Eq. (11) plus noise; p_mean_variance computes it through
// x0_hat (Eq. 15), clipped to [-1, 1] as the official sampler does (clip_denoised).
// To watch it in gdb (`make debug`, README): break p_sample if t_idx[0] == 995 (the
// fifth step), then print x_t[0]@4 and out[0]@4 (the network's eps_theta).

// How to take the steps: Alg. 2's, DDIM's or DPM-Solver++'s (10.2).
typedef enum { SAMPLER_ALG2, SAMPLER_DDIM, SAMPLER_DPM } SamplerKind;
typedef struct {
    MeanType mean;     // what the network outputs (section 3)
    VarType var;       // Alg. 2's sigma_t^2 (section 3)
    SamplerKind kind;  // the step: Alg. 2's, or one of 10.2
    double eta;        // DDIM's eta in [0, 1]
} Sampler;

// One step of a chain as its watcher sees it: x_t holds the B images after the step,
// x0_hat their predicted x_0 (Eq. 15).
typedef struct {
    const float *x_t, *x0_hat;  // (B, C, H, W) each
    int t_idx;                  // the step just taken, on the chain's schedule
    int t;                      // the same step as the trained chain counts it, 1..T
    int start, B;               // images [start, start + B) of all the caller draws
    size_t n;                   // values per image
} ChainStep;

// Whoever follows a chain (a progress line and Ctrl-C, the record of Fig. 6) passes one
// watcher: a function told of every step, which returns 0 to stop the chain there.
typedef struct { int (*step)(void* ctx, const ChainStep* st); void* ctx; } Watch;

// A running chain: the scratch of one step for B images, and its watcher.
typedef struct {
    float *mean, *x0_hat, *z;   // (B, C, H, W) each
    float* log_var;             // (B, C, H, W): log sigma_t^2
    int* t_idx;                 // (B): the chain's step
    int* t_model;               // (B): the network's timestep for it (section 10.2)
    float* x0_prev;             // (B, C, H, W): DPM-Solver++'s x0_hat of the step before (10.2)
    double h_prev;              // and that step's h in log-SNR; 0 at a chain's first step
    int shared_noise;           // one image's z for all B images (the interpolations of 10.3)
    const Watch* watch;         // told of every step (may be NULL)
    int start;                  // the first image's number among all the caller draws
} Chain;

static void chain_init(Chain* ch, int B, size_t n, const Watch* watch) {
    size_t k = (size_t)B * n;
    ch->mean = malloc_check(5 * k * sizeof(float), "sampling buffers");
    ch->x0_hat = ch->mean + k, ch->z = ch->mean + 2 * k, ch->log_var = ch->mean + 3 * k, ch->x0_prev = ch->mean + 4 * k;
    ch->t_idx = malloc_check(2 * (size_t)B * sizeof(int), "sampling buffers");
    ch->t_model = ch->t_idx + B;
    ch->shared_noise = 0;
    ch->watch = watch;
    ch->start = 0;
}

static void chain_free(Chain* ch) { free(ch->mean); free(ch->t_idx); }

// z ~ N(0, I) for the batch: B * n draws, or n draws copied to every image.
static void draw_z(Chain* ch, int B, size_t n, Rng* rng) {
    rng_normal(rng, ch->z, ch->shared_noise ? n : (size_t)B * n);
    if (ch->shared_noise)
        for (int b = 1; b < B; b++) memcpy(ch->z + b * n, ch->z, n * sizeof(float));
}

// Alg. 2, lines 3-4 (the official p_sample): x_t is overwritten by x_{t-1}, for B images
// at steps t_idx[b], from the network's output `out` (eps_theta for the paper's model).
// z is drawn for the whole batch unless every image is at t = 1.
static void p_sample(float* x_t, const float* out, const int* t_idx, int B, size_t n, const Sampler* sp,
                     const Schedule* s, Chain* ch, Rng* rng) {
    p_mean_variance(ch->mean, ch->log_var, ch->x0_hat, x_t, out, t_idx, B, n, sp->mean, sp->var, 1, s);
    int any_noise = 0;
    for (int b = 0; b < B; b++) any_noise |= t_idx[b] > 0;
    if (any_noise) draw_z(ch, B, n, rng);                                 // z ~ N(0, I) if t > 1
    for (int b = 0; b < B; b++) {
        if (t_idx[b] == 0) {                                              // else z = 0
            memcpy(x_t + b * n, ch->mean + b * n, n * sizeof(float));
            continue;
        }
        for (size_t i = b * n; i < (b + 1) * n; i++)
            x_t[i] = ch->mean[i] + (float)exp(0.5 * ch->log_var[i]) * ch->z[i];
    }
}

// ---- 10.1 The chain, from any step down to x_0 ----

static void ddim_sample(float* x_t, const float* out, const int* t_idx, int B, size_t n, const Sampler* sp,
                        const Schedule* s, Chain* ch, Rng* rng);
static void dpm_solver_sample(float* x_t, const float* out, const int* t_idx, int B, size_t n, const Sampler* sp,
                              const Schedule* s, Chain* ch);

// Lines 2-5 of Alg. 2 (or the DDIM steps) for B images held in x, from the chain's step
// t_from down to t = 1: x holds x_{t_from + 1} on entry (0-based t_from) and x_0 on
// return. Returns 0 if the watcher stopped it.
static int reverse_chain(UNet* m, const Schedule* s, const Sampler* sp, float* x, int B, int t_from,
                         Chain* ch, Rng* rng) {
    size_t n = (size_t)m->cfg.in_ch * m->cfg.img * m->cfg.img;
    m->train = 0;
    m->no_grad = 1;
    ch->h_prev = 0;
    for (int t_idx = t_from; t_idx >= 0; t_idx--) {        // 2: for t = T (t_from + 1), ..., 1 do
        for (int b = 0; b < B; b++) ch->t_idx[b] = t_idx, ch->t_model[b] = s->t_model[t_idx];
        const float* out = unet_forward(m, x, ch->t_model, B);          // eps_theta(x_t, t)
        if (sp->kind == SAMPLER_DDIM) ddim_sample(x, out, ch->t_idx, B, n, sp, s, ch, rng);   // (10.2)
        else if (sp->kind == SAMPLER_DPM) dpm_solver_sample(x, out, ch->t_idx, B, n, sp, s, ch);
        else p_sample(x, out, ch->t_idx, B, n, sp, s, ch, rng);            // 3-4: z; x_{t-1}
        ChainStep st = {x, ch->x0_hat, t_idx, s->t_model[t_idx] + 1, ch->start, B, n};
        if (ch->watch && !ch->watch->step(ch->watch->ctx, &st)) return 0;
    }                                                      // 5: end for
    return 1;
}

// Alg. 2 for n_images, in batches of the network's B_max, on the schedule s (the
// trained one, or a respaced one). Returns 0 if the watcher stopped it.
static int p_sample_loop(UNet* m, const Schedule* s, const Sampler* sp, float* out, int n_images, Rng* rng,
                         const Watch* watch) {
    int Bm = m->B_max, done = 1;
    size_t n = (size_t)m->cfg.in_ch * m->cfg.img * m->cfg.img;
    Chain ch;
    chain_init(&ch, Bm, n, watch);
    for (ch.start = 0; ch.start < n_images && done; ch.start += Bm) {
        int B = n_images - ch.start < Bm ? n_images - ch.start : Bm;
        float* x_t = out + (size_t)ch.start * n;
        rng_normal(rng, x_t, (size_t)B * n);                  // 1: x_T ~ N(0, I)
        done = reverse_chain(m, s, sp, x_t, B, s->T - 1, &ch, rng);   // 2-5
    }
    chain_free(&ch);
    return done;                                           // 6: return x_0 (in out)
}

// The record of Fig. 6: x_t and x0_hat of the first n_images images at every `every`-th
// step ((t_idx + 1) % every == 0) and at t_idx = 0. A watcher calls trace_record.
typedef struct {
    int every;
    int n_images, n_steps, max_steps;
    int* steps;           // t (1-based, the network's) of each record
    float *x_t, *x0_hat;  // (max_steps, n_images, C, H, W)
} Trace;

static void trace_record(Trace* tr, const ChainStep* st) {
    if (st->start > 0 || tr->n_steps >= tr->max_steps || ((st->t_idx + 1) % tr->every && st->t_idx != 0)) return;
    size_t k = (size_t)tr->n_steps++ * tr->n_images * st->n;
    memcpy(tr->x_t + k, st->x_t, tr->n_images * st->n * sizeof(float));
    memcpy(tr->x0_hat + k, st->x0_hat, tr->n_images * st->n * sizeof(float));
    tr->steps[tr->n_steps - 1] = st->t;
}

// Makes tr record every T/10-th step of the first n_images images (n values each).
static void trace_init(Trace* tr, int n_images, int T, size_t n) {
    memset(tr, 0, sizeof *tr);
    tr->every = T >= 10 ? T / 10 : 1;
    tr->n_images = n_images;
    tr->max_steps = T / tr->every + 1;
    tr->steps = malloc_check(tr->max_steps * sizeof(int), "the trace");
    tr->x_t = malloc_check((size_t)tr->max_steps * n_images * n * sizeof(float), "the trace");
    tr->x0_hat = malloc_check((size_t)tr->max_steps * n_images * n * sizeof(float), "the trace");
}

static void trace_free(Trace* tr) { free(tr->steps); free(tr->x_t); free(tr->x0_hat); }

// ---- 10.2 Sampling in fewer steps: a respaced chain, and DDIM ----
//
// Alg. 2 runs the network T = 1000 times per sample (the paper's 256 samples take 17 s
// on a TPU v3-8; on a CPU this is the cost that matters). Nothing in Eq. (4) needs the
// steps to be consecutive: q(x_t|x_0) depends on t only through alpha_bar_t. So, as in
// Nichol & Dhariwal (2021, §4), any increasing tau_1 < ... < tau_K of 1..T is a forward
// chain of K steps with the same marginals, whose betas are
//   beta'_i = 1 - alpha_bar_{tau_i} / alpha_bar_{tau_{i-1}},   alpha_bar_{tau_0} = 1,
// and the network trained on all T steps is used unchanged, at t = tau_i. Sections 4-5
// then run on the respaced Schedule as they are: its posterior (Eq. 7), its two fixed
// variances, its bound. We take K evenly strided steps with both ends kept,
// tau_i = 1 + round((i - 1)(T - 1)/(K - 1)), and tau_1 = T for K = 1. Where two kept
// steps are consecutive the ratio is exactly alpha_t, so beta_t is kept as it is:
// K = T is then Algorithm 2 bit for bit. DPM-Solver++ (below) takes its K steps evenly in
// lambda_t = log(sqrt(abar_t) / sqrt(1 - abar_t)) instead (log_snr): each tau_i is the
// step whose lambda is nearest, kept distinct from its neighbours.
static double log_snr(const Schedule* s, int t) { return 0.5 * log(s->alphas_cumprod[t] / (1 - s->alphas_cumprod[t])); }

static void schedule_respace(Schedule* r, const Schedule* s, int K, int by_log_snr) {
    schedule_alloc(r, K);
    double abar_prev = 1.0, lo = log_snr(s, 0), hi = log_snr(s, s->T - 1);
    int prev = -1;
    for (int i = 0; i < K; i++) {
        int tau = K == 1 ? s->T - 1 : (int)floor(i * (double)(s->T - 1) / (K - 1) + 0.5);
        if (by_log_snr && K > 1) {   // lambda falls with t: walk up to the nearest, leave room for the rest
            double want = lo + i * (hi - lo) / (K - 1);
            for (tau = prev + 1; tau < s->T - K + i && fabs(log_snr(s, tau + 1) - want) < fabs(log_snr(s, tau) - want);)
                tau++;
        }
        r->t_model[i] = tau;
        r->betas[i] = tau == prev + 1 ? s->betas[tau] : 1.0 - s->alphas_cumprod[tau] / abar_prev;
        abar_prev = s->alphas_cumprod[tau];
        prev = tau;
    }
    schedule_derive(r);
}

// DDIM (Song, Meng, Ermon 2021) keeps the marginals of Eq. (4) but not the Markov
// chain, and its reverse step (their Eq. 12) is
//   x_{t-1} = sqrt(abar_{t-1}) x0_hat + sqrt(1 - abar_{t-1} - sigma_t^2) eps_hat + sigma_t z,
//   sigma_t^2 = eta^2 (1 - abar_{t-1})/(1 - abar_t) (1 - abar_t/abar_{t-1})     (their Eq. 16)
// over the steps of the (respaced) schedule. eta = 0 adds no noise: x_0 is a fixed
// function of x_T. eta = 1 gives sigma_t^2 = beta_tilde_t (Eq. 7), and the step is then
// Alg. 2's with sigma_t^2 = beta_tilde_t. As the official DDIM code does, x0_hat is
// clipped to [-1, 1] and eps_hat recomputed from it (Eq. 4 solved for eps).

static double ddim_sigma2(int t_idx, double eta, const Schedule* s) {
    double abar = s->alphas_cumprod[t_idx], abar_prev = s->alphas_cumprod_prev[t_idx];
    return eta * eta * (1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev);
}

static void ddim_sample(float* x_t, const float* out, const int* t_idx, int B, size_t n, const Sampler* sp,
                        const Schedule* s, Chain* ch, Rng* rng) {
    p_mean_variance(ch->mean, NULL, ch->x0_hat, x_t, out, t_idx, B, n, sp->mean, sp->var, 1, s);
    int any_noise = 0;
    for (int b = 0; b < B; b++) any_noise |= sp->eta > 0 && t_idx[b] > 0;
    if (any_noise) draw_z(ch, B, n, rng);
    for (int b = 0; b < B; b++) {
        int ti = t_idx[b];
        double abar_prev = s->alphas_cumprod_prev[ti], sig2 = ddim_sigma2(ti, sp->eta, s);
        float c_x0 = (float)sqrt(abar_prev), c_eps = (float)sqrt(fmax(0.0, 1.0 - abar_prev - sig2));
        float sigma = (float)sqrt(sig2), r0 = (float)s->sqrt_recip_alphas_cumprod[ti];
        float r1 = (float)s->sqrt_recipm1_alphas_cumprod[ti];
        for (size_t i = b * n; i < (b + 1) * n; i++) {
            float eps_hat = (r0 * x_t[i] - ch->x0_hat[i]) / r1;
            x_t[i] = c_x0 * ch->x0_hat[i] + c_eps * eps_hat + (sigma > 0 ? sigma * ch->z[i] : 0.0f);
        }
    }
}

// DPM-Solver++ (Lu et al. 2022b) reads DDIM with eta = 0 as a step of an ODE. With
// alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t) and lambda_t = log(alpha_t / sigma_t),
// write DDIM's step from s to t with eps_hat = (x_s - alpha_s x0_hat) / sigma_s:
//   x_t = sigma_t / sigma_s x_s + (alpha_t - alpha_s sigma_t / sigma_s) x0_hat
//       = sigma_t / sigma_s x_s + alpha_t (1 - e^{-h}) x0_hat,      h = lambda_t - lambda_s,
// the exact solution of the probability-flow ODE, in their data-prediction form, were
// x0_hat constant over the step: DDIM is the ODE's first-order solver. Their Algorithm 2,
// DPM-Solver++(2M), takes x0_hat as linear in lambda instead, its slope from the x0_hat of
// the step before (h_prev earlier), at no extra network call: the same step with
//   D = (1 + 1/(2r)) x0_hat - 1/(2r) x0_hat_prev,   r = h_prev / h.
// The first step has no history, and the last, to sigma = 0 (abar_0 = 1), has h = inf:
// both take x0_hat itself (the last one is x_0 = x0_hat, as DDIM's). x0_hat is clipped
// to [-1, 1] as everywhere in this file; the steps are even in lambda (10.2's respacing).
static void dpm_solver_sample(float* x_t, const float* out, const int* t_idx, int B, size_t n, const Sampler* sp,
                              const Schedule* s, Chain* ch) {
    p_mean_variance(ch->mean, NULL, ch->x0_hat, x_t, out, t_idx, B, n, sp->mean, sp->var, 1, s);
    int ti = t_idx[0];   // the whole batch is at one step (reverse_chain)
    double a_s = sqrt(s->alphas_cumprod[ti]), sg_s = sqrt(1 - s->alphas_cumprod[ti]);
    double a_t = sqrt(s->alphas_cumprod_prev[ti]), sg_t = sqrt(1 - s->alphas_cumprod_prev[ti]);
    double h = ti > 0 ? log(a_t / sg_t) - log(a_s / sg_s) : INFINITY;
    double r = ch->h_prev / h, c1 = ti > 0 && r > 0 ? 1 + 0.5 / r : 1, c0 = 1 - c1;   // D = c1 x0_hat + c0 prev
    float cx = (float)(sg_t / sg_s), cd = (float)(a_t - a_s * sg_t / sg_s);
    for (size_t i = 0; i < (size_t)B * n; i++)   // (x0_prev is not read at a first step: it holds no values yet)
        x_t[i] = cx * x_t[i] + cd * (c0 != 0 ? (float)c1 * ch->x0_hat[i] + (float)c0 * ch->x0_prev[i] : ch->x0_hat[i]);
    memcpy(ch->x0_prev, ch->x0_hat, (size_t)B * n * sizeof(float));
    ch->h_prev = h;
}

// ---- 10.3 The chain started from data: reconstructions (§4.3, Fig. 7), interpolations (§4.4, Fig. 8) ----
//
// §4.3 reads the reverse process as a hierarchy: encode x_0 to x_t ~ q(x_t|x_0) (Eq. 4),
// then decode x_0 ~ p_theta(x_0|x_t) with the chain from step t. Samples that share x_t
// share what x_t kept: for large t only coarse features survive, for small t the
// details do (Fig. 7). §4.4 interpolates in that latent space: x_t and x'_t from two
// images with the same noise draw, x_bar_t = (1 - lambda) x_t + lambda x'_t, each
// decoded by the reverse chain; the sampling noise is the same for every lambda (Fig. 8's
// "fixed noise"), so that only lambda changes the picture. Small t stays close to
// pixel-space blending; large t gives new, plausible images (Fig. 9).

// Image x_0 (n values) at step t_idx: writes x_t (n) and k decodings x_0 ~ p_theta(x_0|x_t)
// (k * n, k <= m->B_max). Returns 0 if the watcher stopped it.
static int reconstruct(UNet* m, const Schedule* s, const Sampler* sp, const float* x_0, int t_idx, int k,
                       float* x_t, float* samples, Rng* rng, const Watch* watch) {
    size_t n = (size_t)m->cfg.in_ch * m->cfg.img * m->cfg.img;
    float* eps = malloc_check(n * sizeof(float), "the encoding");
    rng_normal(rng, eps, n);                                   // eps of Eq. (4), once
    q_sample(x_t, x_0, eps, &t_idx, 1, n, s);
    free(eps);
    for (int j = 0; j < k; j++) memcpy(samples + j * n, x_t, n * sizeof(float));
    Chain ch;
    chain_init(&ch, k, n, watch);
    int done = reverse_chain(m, s, sp, samples, k, t_idx, &ch, rng);
    chain_free(&ch);
    return done;
}

// Images a and b at step t_idx, decoded at n_lambda >= 2 evenly spaced lambda in [0, 1]
// (one image each in out, n_lambda <= m->B_max). Returns 0 if the watcher stopped it.
static int interpolate(UNet* m, const Schedule* s, const Sampler* sp, const float* a, const float* b, int t_idx,
                       int n_lambda, float* out, Rng* rng, const Watch* watch) {
    size_t n = (size_t)m->cfg.in_ch * m->cfg.img * m->cfg.img;
    float* eps = malloc_check(3 * n * sizeof(float), "the encodings");
    float *xa = eps + n, *xb = eps + 2 * n;
    rng_normal(rng, eps, n);                                   // one eps for both images
    q_sample(xa, a, eps, &t_idx, 1, n, s);                     // x_t
    q_sample(xb, b, eps, &t_idx, 1, n, s);                     // x'_t
    for (int l = 0; l < n_lambda; l++) {
        float lam = (float)l / (n_lambda - 1);
        for (size_t i = 0; i < n; i++) out[l * n + i] = (1 - lam) * xa[i] + lam * xb[i];
    }
    free(eps);
    Chain ch;
    chain_init(&ch, n_lambda, n, watch);
    ch.shared_noise = 1;
    int done = reverse_chain(m, s, sp, out, n_lambda, t_idx, &ch, rng);
    chain_free(&ch);
    return done;
}

// ----------------------------------------------------------------------------
// 11. Evaluation: the variational bound in bits/dim (Eq. 5, Table 1's NLL column)
//
// For each test image, every term of Eq. (5) is estimated with one draw of x_t ~ q(x_t|x_0)
// per t (Eq. 4): L_T by prior_bpd, L_{t-1} for t = 2..T and L_0 by vb_term_bpd, with
// x0_hat clipped to [-1, 1] as the official evaluation does. The paper reports
// <= 3.70 (L, fixed isotropic Sigma) and <= 3.75 (L_simple) bits/dim on CIFAR-10 with
// the full model and 10,000 test images; a small CPU model on a few images gives a rough
// estimate of the same quantity. On a respaced schedule (10.2) the same code gives the
// bound of that K-step chain.
//
// §4.3 reads L as a codelength (Eq. 16 writes it with the marginals q(x_t); Algs. 3-4 send
// x_T, ..., x_1 by reverse coding). A receiver that holds x_t has been sent
//   rate(t) = L_T + sum_{s > t} L_{s-1} bits/dim
// (at t = 1 everything but L_0: 1.78 on CIFAR-10) and can already show x0_hat(x_t) of
// Eq. (15); the distortion is its RMSE against x_0 on the 0..255 scale (Table 4: 0.95 at
// t = 1, 67.6 at t = 901; Fig. 5). L_0 is what is left: 1.97 bits/dim on CIFAR-10.
// eval_bpd reports the three parts of L apart (prior, terms, decoder), and with per_t
// every term and the squared error of x0_hat at every t. Each image's L is one draw of
// eps per t, so the standard error over the images covers both the images and that noise.
//
// The T - 1 KL terms cost T - 1 network evaluations per image: 1,000 images cost hours
// on a CPU. With t_samples = K > 0 their sum is estimated instead, unbiasedly, from K:
// {2, ..., T} is cut into K strata of w_j steps, and each image gets one t drawn
// uniformly from each stratum, weighted by w_j (stratified Monte Carlo: E[w_j L_{t-1}]
// is the stratum's sum). The terms fall steeply over the first few dozen t (Table 4's
// rate), so the strata are narrow there and wide later: stratum j ends at
// j + (T - 1 - K) (j / K)^3, which puts the variance of the estimate far below that of
// equal strata. L_T and L_0 stay exact. Each image's L is then an unbiased draw of its
// bound, so the standard error over the images covers the sampling of t as well. With
// K = T - 1 every stratum is one t: the full sum, bit for bit.
static int stratum_end(int j, int K, int T) { return j + (int)((T - 1 - K) * pow((double)j / K, 3)); }

typedef struct { double prior, terms, decoder, total, std_err; int n; } BoundBpd;

typedef struct {
    double* term;   // (T): L_{t-1} in bits/dim (L_0 at t_idx = 0), averaged over the images
    double* mse;    // (T): mean squared error of the clipped x0_hat(x_t) against x_0, in [-1, 1] units
} PerT;

// The bound of the first n_images test images under the chain s, its mean and variance
// taken as sp says. With per_t (may be NULL) also every term; with t_samples = K > 0 the
// sum of the KL terms from K stratified t per image. The watcher (may be NULL) is told of
// every network evaluation (as a chain step of all the images in the batch) and may stop it.
static BoundBpd eval_bpd(UNet* m, const Schedule* s, const Sampler* sp, const Dataset* test, int n_images,
                         int t_samples, Rng* rng, PerT* per_t, const Watch* watch) {
    int Bm = m->B_max, T = s->T;
    size_t n = (size_t)m->cfg.in_ch * m->cfg.img * m->cfg.img;
    if (n_images > test->N) n_images = test->N;
    size_t k = (size_t)Bm * n * sizeof(float);
    const char* what = "evaluation buffers";
    float *x0 = malloc_check(k, what), *eps = malloc_check(k, what), *x_t = malloc_check(k, what);
    float *mean_q = malloc_check(k, what), *mean_p = malloc_check(k, what);   // the two means of Eq. (5)'s KL
    float *x0_hat = malloc_check(k, what), *lv_p = malloc_check(k, what);     // and p_theta's log variance
    double *lv_q = malloc_check(Bm * sizeof(double), what), *img_L = malloc_check(Bm * sizeof(double), what);
    int *t_idx = malloc_check(Bm * sizeof(int), what), *t_model = malloc_check(Bm * sizeof(int), what);
    double sum_sq = 0;
    BoundBpd r = {0, 0, 0, 0, 0, 0};
    if (per_t)
        for (int ti = 0; ti < T; ti++) per_t->term[ti] = per_t->mse[ti] = 0;
    m->train = 0;
    m->no_grad = 1;
    int levels = t_samples > 0 ? t_samples + 1 : T;   // the strata from the top, then t = 1 (t_idx 0)
    int go = 1;
    for (int start = 0; start < n_images && go; start += Bm) {
        int B = n_images - start < Bm ? n_images - start : Bm;
        for (int b = 0; b < B; b++) {
            dataset_image(x0 + b * n, test, start + b, 0);
            img_L[b] = prior_bpd(x0 + b * n, n, s);
            r.prior += img_L[b];
        }
        for (int j = levels - 1; j >= 0 && go; j--) {
            double w = 1;   // how many terms this level's t stands for
            if (t_samples > 0 && j > 0) {
                int lo = 1 + stratum_end(j - 1, t_samples, T), hi = 1 + stratum_end(j, t_samples, T);
                w = hi - lo;
                for (int b = 0; b < B; b++) t_idx[b] = lo + (hi - lo > 1 ? rng_int(rng, hi - lo) : 0);
            } else {
                for (int b = 0; b < B; b++) t_idx[b] = t_samples > 0 ? 0 : j;
            }
            for (int b = 0; b < B; b++) t_model[b] = s->t_model[t_idx[b]];
            rng_normal(rng, eps, (size_t)B * n);
            q_sample(x_t, x0, eps, t_idx, B, n, s);
            q_posterior_mean_variance(mean_q, NULL, lv_q, x0, x_t, t_idx, B, n, s);
            const float* out = unet_forward(m, x_t, t_model, B);
            p_mean_variance(mean_p, lv_p, x0_hat, x_t, out, t_idx, B, n, sp->mean, sp->var, 1, s);
            for (int b = 0; b < B; b++) {
                int ti = t_idx[b];
                double v = w * vb_term_bpd(x0 + b * n, mean_q + b * n, lv_q[b], mean_p + b * n, lv_p + b * n, ti, n);
                if (ti == 0) r.decoder += v; else r.terms += v;
                img_L[b] += v;
                if (!per_t) continue;
                double se = 0;
                for (size_t i = b * n; i < (b + 1) * n; i++) se += ((double)x0_hat[i] - x0[i]) * ((double)x0_hat[i] - x0[i]);
                per_t->term[ti] += v;
                per_t->mse[ti] += se / n;
            }
            ChainStep st = {x_t, x0_hat, t_idx[0], t_model[0] + 1, start, B, n};
            go = !watch || watch->step(watch->ctx, &st);
        }
        if (!go) break;
        for (int b = 0; b < B; b++) sum_sq += img_L[b] * img_L[b];
        r.n += B;
    }
    if (r.n) { r.prior /= r.n; r.terms /= r.n; r.decoder /= r.n; }
    if (r.n && per_t)
        for (int ti = 0; ti < T; ti++) per_t->term[ti] /= r.n, per_t->mse[ti] /= r.n;
    r.total = r.prior + r.terms + r.decoder;
    if (r.n > 1) r.std_err = sqrt(fmax(0.0, (sum_sq / r.n - r.total * r.total) * r.n / (r.n - 1)) / r.n);
    free(x0); free(eps); free(x_t); free(mean_q); free(mean_p); free(x0_hat); free(lv_p);
    free(lv_q); free(img_L); free(t_idx); free(t_model);
    return r;
}

// rate[t_idx] = L_T + sum_{s > t} L_{s-1}, from the per-t terms (T values each).
static void bound_rate(double* rate, const double* term, double prior, int T) {
    rate[T - 1] = prior;
    for (int ti = T - 2; ti >= 0; ti--) rate[ti] = rate[ti + 1] + term[ti + 1];
}

// ============================================================================
// Part II. The network eps_theta(x_t, t) (§4, Appendix B)
// ============================================================================
//
// "We use a U-Net backbone similar to an unmasked PixelCNN++ with group normalization
// throughout. Parameters are shared across time, which is specified to the network
// using the Transformer sinusoidal position embedding. We use self-attention at the
// 16 x 16 feature map resolution." (§4). The layout below is the official CIFAR-10
// model (diffusion_tf/models/unet.py; 35.7M parameters with the `paper` preset); the
// compact presets shrink it for a CPU. The paper's 256x256 models (LSUN, CelebA-HQ) are
// the same code with six levels instead of four (the `paper256` preset, 114M): nothing
// below depends on the image side. This part reads from the whole down to the
// parts: the types (12), the whole network forward and backward (13), its blocks (14),
// how its buffers are laid out (15), and every layer as a plain reference (16).

// ----------------------------------------------------------------------------
// 12. The U-Net's parts (Appendix B): parameter tensors, layers, blocks
#define MAX_BLOCKS 256            // enough for every configuration config_check accepts
#define MAX_PARAM_TENSORS 4096

typedef enum { INIT_UNIFORM, INIT_ZERO, INIT_ONE } InitKind;

typedef struct {
    char name[64];        // PyTorch state_dict name, e.g. "down.0.block.1.conv1.weight"
    char group[32];       // the block it belongs to, e.g. "down.0.block.1"
    int ndim, shape[4];
    size_t offset, numel; // into UNet.params (and UNet.grads, same layout)
    InitKind init;
    float bound;          // INIT_UNIFORM: U(-bound, bound)
} ParamTensor;

typedef struct { float *w, *b, *dw, *db; int C_in, C_out, K, stride; } Conv2d;  // w (C_out, C_in, K, K)
typedef struct { float *w, *b, *dw, *db; int C_in, C_out; } Linear;            // w (C_out, C_in)
typedef struct { float *gamma, *beta, *dgamma, *dbeta; int C, G; } GroupNorm;  // (C)

typedef enum { BLOCK_RES, BLOCK_ATTN, BLOCK_DOWN, BLOCK_UP } BlockKind;

// One block of the U-Net. Its input is `in` (and, for ResBlocks of the up path,
// concatenated with `skip`), its output `out`; all are views into the activation
// buffer (UNetLayers.acts), with the gradients din, dskip, dout in grad_acts or work.
typedef struct {
    BlockKind kind;
    char name[32];
    int C_in, C_skip, C_out, H, W;  // input (C_in + C_skip, H, W) -> output (C_out, H', W')
    // BLOCK_RES: out = shortcut(x) + conv2(dropout(silu(norm2(h1)))),
    //            h1 = conv1(silu(norm1(x))) + temb_proj(silu(temb))
    GroupNorm norm1, norm2;
    Conv2d conv1, conv2, nin_shortcut;   // nin_shortcut only when C_in + C_skip != C_out
    Linear temb_proj;
    float *mean1, *rstd1, *h1, *mean2, *rstd2;   // saved: (B, G), (B, C_out, H, W)
    float *a1, *a2;     // saved: silu(norm1(x)), dropout(silu(norm2(h1))), the convs' inputs (section 14)
    // BLOCK_ATTN: out = x + proj_out(attention(q(n), k(n), v(n))), n = norm(x)
    GroupNorm norm;
    Conv2d q, k, v, proj_out;
    float *mean, *rstd, *qa, *ka, *va, *att, *o;  // saved: (B, G), (B, C, HW) x3, att (B, HW, HW), (B, C, HW)
    // BLOCK_DOWN: out = conv (3x3, stride 2);  BLOCK_UP: out = conv (3x3) of upsample(x)
    Conv2d conv;
    int src, skip_src;   // the blocks whose outputs it reads (section 15.1)
    int kept;            // its output is also read by an up-path block, as a skip
    const float *in, *skip;
    float *out;
    float *din, *dskip, *dout;
    int din_transient;   // din is a shared ping-pong buffer: zero it before this block's backward
} Block;

#define N_SCRATCH 5

struct UNetLayers {
    // what each parameter tensor is and where it lives in UNet.params (and UNet.grads)
    ParamTensor tensors[MAX_PARAM_TENSORS];
    int n_tensors;
    // the layers, in the order they run
    Linear dense0, dense1;      // the timestep MLP: ch -> 4ch -> 4ch
    Conv2d conv_in;
    Block blocks[MAX_BLOCKS];
    int n_blocks;
    GroupNorm norm_out;
    Conv2d conv_out;
    // saved activations (one buffer), each for B_max images
    size_t n_acts;
    float* acts;
    float *temb_sin, *temb_h, *temb_a, *temb, *temb_act;  // (B, ch), then (B, 4ch) x4
    float *x;                   // (B, in_ch, img, img): the input x_t
    float *h0, *d_h0;           // (B, ch, img, img): conv_in's output, the first skip
    float *h_last;              // (B, ch * ch_mult[0], img, img): the up path's output
    float *mean_out, *rstd_out; // (B, G)
    float *a_out;               // silu(norm_out(h_last)), as conv_out's input (conv_input_floats)
    float *eps_theta;           // (B, out_channels, img, img): the output
    // gradients of the activations that must live across blocks (one buffer)
    size_t n_grad_acts;
    float* grad_acts;
    float *d_temb_act, *d_temb, *d_temb_a, *d_temb_h;   // (B, 4ch)
    float *d_h_last;
    // temporaries of one block, forward or backward (one buffer)
    size_t n_work;
    float* work;
    float* scratch[N_SCRATCH];  // each (B, max C, max HW) over all blocks
    float* ping[2];             // gradients of tensors read by exactly one block
    float *conv_ws;             // scratch of one layer call (conv2d_workspace_floats)
    float *datt;                // (HW, HW) of one image per thread
    float *tproj;               // (B, max C): a ResBlock's timestep projection
    size_t max_numel;           // per image; found by the first layout pass
    size_t max_conv_ws;         // the largest workspace of any layer, for B_max images
    int max_attn_hw, n_transient;
};

// ---- 12.1 The layers, as the network calls them (§4: conv, GroupNorm, attention) ----
// Every layer is a function of section 16, a plain reference implementation, a screenful
// with its forward beside its backward. The costly ones also have a fast kernel in Part
// III, of the same name with _fast and the same arguments, to which the layer's first line
// (FAST, section 16) hands the work. Built with -DDDPM_PLAIN (make plain, make debug) that
// line is empty and Part III is not compiled at all. tests/ checks every fast kernel
// against its reference.
//
// Arguments run outputs, inputs, weights, dims, scratch:
//   xxx_forward(out, <saved for backward>, inp, <weights>, <dims>, <scratch>)
//   xxx_backward(dinp, <dweights>, dout, inp, <weights>, <saved>, <dims>, <scratch>)
// Backward functions accumulate (+=) into dinp and into the weight gradients, so a
// tensor read twice (a skip connection) simply receives both contributions; the
// callers zero what needs zeroing. dinp may be NULL where no input gradient is needed.

// The thread count the layers' scratch is sized for, and that their parallel loops
// ask for: read once, by layers_init (unet_build calls it), so no step allocates.
static int kernel_threads;
static int max_threads(void);   // OpenMP's thread count, or 1 (Part IV)
static void layers_init(void);

// Convolution, K x K (3 or 1), stride 1 ("SAME" padding) or 2 (the official Downsample):
//   out (B, C_out, H/stride, W/stride) = inp (B, C_in, H, W) * weight (C_out, C_in, K, K) + bias (C_out)
// ws: conv2d_workspace_floats(...) floats of scratch.
static void conv2d_forward(float* out, const float* inp, const float* weight, const float* bias,
                           int B, int C_in, int H, int W, int C_out, int K, int stride, float* ws);
static void conv2d_backward(float* dinp, float* dweight, float* dbias, const float* dout,
                            const float* inp, const float* weight,
                            int B, int C_in, int H, int W, int C_out, int K, int stride, float* ws);
static size_t conv2d_workspace_floats(int B, int C_in, int H, int W, int C_out, int K, int stride, int threads);

// The unit the U-Net is built of (section 14): h = conv3x3(dropout(silu(groupnorm(x)))),
// its input a = dropout(silu(groupnorm(x))) kept for the backward pass, conv_input_floats(H, W)
// floats a channel (H W; Part III keeps zero-bordered grids, written straight by its GroupNorm).
typedef struct { float p; uint64_t key; } Dropout;   // a dropout's rate and its mask's key
static const Dropout NO_DROPOUT = {0.0f, 0};
static size_t conv_input_floats(int H, int W);
static void norm_silu_conv_forward(float* h, float* a, float* mean, float* rstd, const float* x,
                                   const GroupNorm* n, const Conv2d* c, int B, int H, int W, Dropout d, float* ws);
static void norm_silu_conv_backward(float* dx, GroupNorm* n, Conv2d* c, const float* dh, const float* x,
                                    const float* a, const float* mean, const float* rstd, int B, int H, int W,
                                    Dropout d, float* tmp1, float* tmp2, float* ws);

// Nearest-neighbour 2x upsampling, then a 3x3 convolution (the official Upsample):
//   out (B, C_out, 2H, 2W) = conv3x3(upsample(inp (B, C_in, H, W)))
static void upsample_conv_forward(float* out, const float* inp, const float* weight, const float* bias,
                                  int B, int C_in, int H, int W, int C_out, float* ws);
static void upsample_conv_backward(float* dinp, float* dweight, float* dbias, const float* dout,
                                   const float* inp, const float* weight, int B, int C_in, int H, int W,
                                   int C_out, float* ws);
static size_t upsample_conv_workspace_floats(int B, int C_in, int H, int W, int C_out, int threads);

// Linear: out (B, C_out) = inp (B, C_in) . weight^T + bias, weight (C_out, C_in) as in PyTorch.
static void linear_forward(float* out, const float* inp, const float* weight, const float* bias,
                           int B, int C_in, int C_out);
static void linear_backward(float* dinp, float* dweight, float* dbias, const float* dout,
                            const float* inp, const float* weight, int B, int C_in, int C_out);

// SiLU ("swish", the official nonlinearity): out = inp sigmoid(inp), N values.
static void silu_forward(float* out, const float* inp, size_t N);
static void silu_backward(float* dinp, const float* dout, const float* inp, size_t N);

// GroupNorm over G groups of channels, then SiLU if `silu`: (B, C, HW) -> (B, C, HW);
// mean, rstd (B, G) are saved for the backward pass.
static void groupnorm_forward(float* out, float* mean, float* rstd, const float* inp,
                              const float* gamma, const float* beta, int B, int C, int HW, int G, int silu);
static void groupnorm_backward(float* dinp, float* dgamma, float* dbeta, const float* dout,
                               const float* inp, const float* gamma, const float* beta,
                               const float* mean, const float* rstd, int B, int C, int HW, int G, int silu);

// Self-attention over the N = H W positions of each image: q, k, v, out (B, C, N),
// att (B, N, N) the softmax weights, saved for the backward pass (NULL in sampling: then
// they go to scratch, N x N floats per thread; Part III keeps them transposed).
static void attention_forward(float* out, float* att, const float* q, const float* k, const float* v,
                              int B, int C, int N, float* scratch);
static void attention_backward(float* dq, float* dk, float* dv, const float* dout,
                               const float* q, const float* k, const float* v, const float* att,
                               int B, int C, int N, float* scratch);

// dv[b, c] = sum of dh[b, c, :] over the pixels: the backward of add_channel_bias.
static void sum_channel(float* dv, const float* dh, int B, int C, int HW);

// Layers with one implementation, in section 16: plain loops already.
static void dropout_forward(float* out, const float* inp, size_t N, float p, uint64_t key);
static void dropout_backward(float* dinp, const float* dout, size_t N, float p, uint64_t key);
static void concat_forward(float* out, const float* a, const float* b, int B, int Ca, int Cb, int HW);
static void concat_backward(float* da, float* db, const float* dout, int B, int Ca, int Cb, int HW);
static void timestep_embedding(float* out, const int* t_idx, int B, int dim);
static void add_channel_bias(float* h, const float* v, int B, int C, int HW);
static void add_inplace(float* y, const float* x, size_t N);
static void zero(float* x, size_t n);

// FAST: a layer's first line, which in the default build hands the work to its kernel in
// Part III (of the same type: its prototype is below) and returns; with -DDDPM_PLAIN it is
// empty. tests/ set fast_layers to 0 to run a reference in the same binary as its kernel.
#ifdef DDPM_PLAIN
#define FAST(call)
#define FAST_RETURN(call)
#else
static int fast_layers = 1;
#define FAST(call) do { if (fast_layers) { call; return; } } while (0)
#define FAST_RETURN(call) do { if (fast_layers) return call; } while (0)
static __typeof__(layers_init) layers_init_fast; static __typeof__(conv2d_forward) conv2d_forward_fast;
static __typeof__(conv2d_backward) conv2d_backward_fast;
static __typeof__(conv2d_workspace_floats) conv2d_workspace_floats_fast;
static __typeof__(conv_input_floats) conv_input_floats_fast;
static __typeof__(norm_silu_conv_forward) norm_silu_conv_forward_fast;
static __typeof__(norm_silu_conv_backward) norm_silu_conv_backward_fast;
static __typeof__(upsample_conv_forward) upsample_conv_forward_fast;
static __typeof__(upsample_conv_backward) upsample_conv_backward_fast;
static __typeof__(upsample_conv_workspace_floats) upsample_conv_workspace_floats_fast;
static __typeof__(linear_forward) linear_forward_fast; static __typeof__(linear_backward) linear_backward_fast;
static __typeof__(silu_forward) silu_forward_fast; static __typeof__(silu_backward) silu_backward_fast;
static __typeof__(groupnorm_forward) groupnorm_forward_fast;
static __typeof__(groupnorm_backward) groupnorm_backward_fast;
static __typeof__(attention_forward) attention_forward_fast;
static __typeof__(attention_backward) attention_backward_fast; static __typeof__(sum_channel) sum_channel_fast;
#endif

// ----------------------------------------------------------------------------
// 13. eps_theta(x_t, t): the whole network, forward and backward (§4, Appendix B)
//
//   temb = dense1(silu(dense0(sinusoid(t))))                  the timestep embedding;
//                                                             each ResBlock adds temb_proj(silu(temb))
//   h    = conv_in(x_t)
//   down path: per level, num_res_blocks ResBlocks (+ AttnBlock at 16x16), Downsample;
//              every output is kept for a skip connection
//   middle:    ResBlock, AttnBlock, ResBlock
//   up path:   per level, num_res_blocks + 1 ResBlocks on concat(h, skip) (+ AttnBlock),
//              Upsample
//   eps_theta = conv_out(silu(norm_out(h)))
// The blocks are listed in L->blocks in the order they run (section 15.1 builds the list),
// so the forward pass walks the list and the backward pass walks it back.

static void resblock_forward(UNet* m, Block* k, int B);
static void resblock_backward(UNet* m, Block* k, int B);
static void attnblock_forward(UNet* m, Block* k, int B);
static void attnblock_backward(UNet* m, Block* k, int B);
static void resample_forward(UNet* m, Block* k, int B);
static void resample_backward(UNet* m, Block* k, int B);

static float* unet_forward(UNet* m, const float* x_t, const int* t_idx, int B) {
    UNetLayers* L = m->L;
    const Config* c = &m->cfg;
    int ch = c->ch, E = 4 * ch, S = c->img;
    if (B > m->B_max) die("internal: batch %d exceeds the %d images the network was built for", B, m->B_max);
    timestep_embedding(L->temb_sin, t_idx, B, ch);
    linear_forward(L->temb_h, L->temb_sin, L->dense0.w, L->dense0.b, B, ch, E);
    silu_forward(L->temb_a, L->temb_h, (size_t)B * E);
    linear_forward(L->temb, L->temb_a, L->dense1.w, L->dense1.b, B, E, E);
    silu_forward(L->temb_act, L->temb, (size_t)B * E);   // every ResBlock uses silu(temb)
    memcpy(L->x, x_t, (size_t)B * c->in_ch * S * S * sizeof(float));
    conv2d_forward(L->h0, L->x, L->conv_in.w, L->conv_in.b, B, c->in_ch, S, S, ch, 3, 1, L->conv_ws);
    for (int i = 0; i < L->n_blocks; i++) {
        Block* k = &L->blocks[i];
        if (k->kind == BLOCK_RES) resblock_forward(m, k, B);
        else if (k->kind == BLOCK_ATTN) attnblock_forward(m, k, B);
        else resample_forward(m, k, B);
    }
    norm_silu_conv_forward(L->eps_theta, L->a_out, L->mean_out, L->rstd_out, L->h_last, &L->norm_out, &L->conv_out,
                           B, S, S, NO_DROPOUT, L->conv_ws);
    return L->eps_theta;
}

static void unet_backward(UNet* m, const float* d_eps_theta, int B) {
    UNetLayers* L = m->L;
    const Config* c = &m->cfg;
    int ch = c->ch, E = 4 * ch, S = c->img;
    zero(L->grad_acts, L->n_grad_acts);   // skip-connection and timestep gradients
    // eps_theta = conv_out(silu(norm_out(h_last)))
    zero(L->d_h_last, (size_t)B * L->norm_out.C * S * S);
    norm_silu_conv_backward(L->d_h_last, &L->norm_out, &L->conv_out, d_eps_theta, L->h_last, L->a_out,
                            L->mean_out, L->rstd_out, B, S, S, NO_DROPOUT, L->scratch[1], L->scratch[2], L->conv_ws);
    for (int i = L->n_blocks - 1; i >= 0; i--) {
        Block* k = &L->blocks[i];
        if (k->din_transient) zero(k->din, (size_t)B * k->C_in * k->H * k->W);
        if (k->kind == BLOCK_RES) resblock_backward(m, k, B);
        else if (k->kind == BLOCK_ATTN) attnblock_backward(m, k, B);
        else resample_backward(m, k, B);
    }
    // h0 = conv_in(x): the input x_t needs no gradient
    conv2d_backward(NULL, L->conv_in.dw, L->conv_in.db, L->d_h0, L->x, L->conv_in.w,
                    B, c->in_ch, S, S, ch, 3, 1, L->conv_ws);
    // the timestep MLP, backwards: temb_act = silu(temb), temb = dense1(silu(dense0(sin)))
    silu_backward(L->d_temb, L->d_temb_act, L->temb, (size_t)B * E);
    linear_backward(L->d_temb_a, L->dense1.dw, L->dense1.db, L->d_temb, L->temb_a, L->dense1.w, B, E, E);
    silu_backward(L->d_temb_h, L->d_temb_a, L->temb_h, (size_t)B * E);
    linear_backward(NULL, L->dense0.dw, L->dense0.db, L->d_temb_h, L->temb_sin, L->dense0.w, B, ch, E);
}

static void unet_zero_grad(UNet* m) { zero(m->grads, m->n_params); }

// ----------------------------------------------------------------------------
// 14. The blocks, forward and backward (Appendix B; the official resnet_block,
// attn_block, downsample and upsample)

// A ResBlock's dropout (over its (B, C_out, H, W) conv2 input): none outside training.
// The mask's key is moved on by the images of the step's batch before these (batch_start;
// hash_u32 is additive), so an image gets the same mask whichever slice computes it.
static Dropout block_dropout(const UNet* m, const Block* k) {
    uint64_t key = m->dropout_key ^ (GOLDEN * (uint64_t)(k - m->L->blocks + 1));
    Dropout d = {m->train ? m->cfg.dropout : 0.0f, key + (uint64_t)m->batch_start * k->C_out * k->H * k->W * GOLDEN};
    return d;
}

// The unit the U-Net is built of, twice in every ResBlock and once before the output:
//   h = conv3x3(dropout(silu(groupnorm(x))))      (d.p = 0: no dropout)
// a = dropout(silu(groupnorm(x))) is kept for the backward pass with GroupNorm's mean and
// rstd. The dropout mask is never stored: its key rebuilds it. (Part III fuses the three.)
static void norm_silu_conv_forward(float* h, float* a, float* mean, float* rstd, const float* x,
                                   const GroupNorm* n, const Conv2d* c, int B, int H, int W, Dropout d, float* ws) {
    FAST(norm_silu_conv_forward_fast(h, a, mean, rstd, x, n, c, B, H, W, d, ws));
    groupnorm_forward(a, mean, rstd, x, n->gamma, n->beta, B, n->C, H * W, n->G, 1);
    if (d.p > 0) dropout_forward(a, a, (size_t)B * n->C * H * W, d.p, d.key);
    conv2d_forward(h, a, c->w, c->b, B, c->C_in, H, W, c->C_out, 3, 1, ws);
}

// dx += d/dx of the above; tmp1, tmp2: (B, C_in, H, W) of scratch each.
static void norm_silu_conv_backward(float* dx, GroupNorm* n, Conv2d* c, const float* dh, const float* x,
                                    const float* a, const float* mean, const float* rstd, int B, int H, int W,
                                    Dropout d, float* tmp1, float* tmp2, float* ws) {
    FAST(norm_silu_conv_backward_fast(dx, n, c, dh, x, a, mean, rstd, B, H, W, d, tmp1, tmp2, ws));
    size_t N = (size_t)B * n->C * H * W;
    float* da = tmp1;
    zero(da, N);
    conv2d_backward(da, c->dw, c->db, dh, a, c->w, B, c->C_in, H, W, c->C_out, 3, 1, ws);   // h = conv3x3(a)
    if (d.p > 0) {   // a = dropout(a'): the mask is rebuilt from its key
        zero(tmp2, N);
        dropout_backward(tmp2, da, N, d.p, d.key);
        da = tmp2;
    }
    groupnorm_backward(dx, n->dgamma, n->dbeta, da, x, n->gamma, n->beta, mean, rstd,   // a' = silu(norm(x))
                       B, n->C, H * W, n->G, 1);
}

// ResBlock:
//   x  = in, or concat(in, skip) on the up path
//   h1 = conv1(silu(norm1(x))) + temb_proj(silu(temb))     [broadcast over H x W]
//   h2 = conv2(dropout(silu(norm2(h1))))
//   out = shortcut(x) + h2,   shortcut = identity or a 1x1 conv ("nin") if channels change
static void resblock_forward(UNet* m, Block* k, int B) {
    UNetLayers* L = m->L;
    int C_x = k->C_in + k->C_skip, C = k->C_out, H = k->H, W = k->W, HW = H * W;
    size_t N = (size_t)B * C * HW;
    const float* x = k->in;
    if (k->skip) { concat_forward(L->scratch[0], k->in, k->skip, B, k->C_in, k->C_skip, HW); x = L->scratch[0]; }
    norm_silu_conv_forward(k->h1, k->a1, k->mean1, k->rstd1, x, &k->norm1, &k->conv1, B, H, W, NO_DROPOUT, L->conv_ws);
    linear_forward(L->tproj, L->temb_act, k->temb_proj.w, k->temb_proj.b, B, 4 * m->cfg.ch, C);
    add_channel_bias(k->h1, L->tproj, B, C, HW);
    norm_silu_conv_forward(k->out, k->a2, k->mean2, k->rstd2, k->h1, &k->norm2, &k->conv2, B, H, W,
                           block_dropout(m, k), L->conv_ws);
    if (k->nin_shortcut.w) {
        float* shortcut = L->scratch[2];
        conv2d_forward(shortcut, x, k->nin_shortcut.w, k->nin_shortcut.b, B, C_x, H, W, C, 1, 1, L->conv_ws);
        add_inplace(k->out, shortcut, N);
    } else {
        add_inplace(k->out, x, N);
    }
}

static void resblock_backward(UNet* m, Block* k, int B) {
    UNetLayers* L = m->L;
    int C_x = k->C_in + k->C_skip, C = k->C_out, H = k->H, W = k->W, HW = H * W;
    size_t N = (size_t)B * C * HW;
    float *x_cat = L->scratch[0], *tmp1 = L->scratch[1], *tmp2 = L->scratch[2], *dh1 = L->scratch[3],
          *dx_cat = L->scratch[4];
    const float* x = k->in;
    float* dx = k->din;
    if (k->skip) {   // x = concat(in, skip): rebuild it, and collect its gradient apart
        concat_forward(x_cat, k->in, k->skip, B, k->C_in, k->C_skip, HW);
        x = x_cat;
        dx = dx_cat;
        zero(dx, (size_t)B * C_x * HW);
    }
    // out = shortcut(x) + h2
    if (k->nin_shortcut.w)
        conv2d_backward(dx, k->nin_shortcut.dw, k->nin_shortcut.db, k->dout, x, k->nin_shortcut.w,
                        B, C_x, H, W, C, 1, 1, L->conv_ws);
    else
        add_inplace(dx, k->dout, N);
    // h2 = conv2(dropout(silu(norm2(h1))))
    zero(dh1, N);
    norm_silu_conv_backward(dh1, &k->norm2, &k->conv2, k->dout, k->h1, k->a2, k->mean2, k->rstd2, B, H, W,
                            block_dropout(m, k), tmp2, tmp1, L->conv_ws);
    // h1 = conv1(silu(norm1(x))) + temb_proj(silu(temb)): the projection gets the per-channel sums
    sum_channel(L->tproj, dh1, B, C, HW);
    linear_backward(L->d_temb_act, k->temb_proj.dw, k->temb_proj.db, L->tproj, L->temb_act,
                    k->temb_proj.w, B, 4 * m->cfg.ch, C);
    norm_silu_conv_backward(dx, &k->norm1, &k->conv1, dh1, x, k->a1, k->mean1, k->rstd1, B, H, W,
                            NO_DROPOUT, tmp2, tmp1, L->conv_ws);
    if (k->skip) concat_backward(k->din, k->dskip, dx, B, k->C_in, k->C_skip, HW);
}

// AttnBlock: n = norm(x); q, k, v = 1x1 convs of n;
//   out = x + proj_out(attention(q, k, v))
static void attnblock_forward(UNet* m, Block* k, int B) {
    UNetLayers* L = m->L;
    int C = k->C_in, H = k->H, W = k->W, HW = H * W;
    float* n = L->scratch[0];
    groupnorm_forward(n, k->mean, k->rstd, k->in, k->norm.gamma, k->norm.beta, B, C, HW, m->cfg.groups, 0);
    conv2d_forward(k->qa, n, k->q.w, k->q.b, B, C, H, W, C, 1, 1, L->conv_ws);
    conv2d_forward(k->ka, n, k->k.w, k->k.b, B, C, H, W, C, 1, 1, L->conv_ws);
    conv2d_forward(k->va, n, k->v.w, k->v.b, B, C, H, W, C, 1, 1, L->conv_ws);
    attention_forward(k->o, m->no_grad ? NULL : k->att, k->qa, k->ka, k->va, B, C, HW, L->datt);
    conv2d_forward(k->out, k->o, k->proj_out.w, k->proj_out.b, B, C, H, W, C, 1, 1, L->conv_ws);
    add_inplace(k->out, k->in, (size_t)B * C * HW);
}

static void attnblock_backward(UNet* m, Block* k, int B) {
    UNetLayers* L = m->L;
    int C = k->C_in, H = k->H, W = k->W, HW = H * W;
    size_t N = (size_t)B * C * HW;
    float *n = L->scratch[0], *do_ = L->scratch[1], *dq = L->scratch[2], *dk = L->scratch[3], *dv = L->scratch[4];
    add_inplace(k->din, k->dout, N);   // the residual connection
    zero(do_, N);
    conv2d_backward(do_, k->proj_out.dw, k->proj_out.db, k->dout, k->o, k->proj_out.w, B, C, H, W, C, 1, 1, L->conv_ws);
    zero(dq, N); zero(dk, N); zero(dv, N);
    attention_backward(dq, dk, dv, do_, k->qa, k->ka, k->va, k->att, B, C, HW, L->datt);
    // n = norm(x), recomputed (the same mean and rstd again); its gradient sums the three projections
    groupnorm_forward(n, k->mean, k->rstd, k->in, k->norm.gamma, k->norm.beta, B, C, HW, m->cfg.groups, 0);
    float* dn = do_;
    zero(dn, N);
    conv2d_backward(dn, k->q.dw, k->q.db, dq, n, k->q.w, B, C, H, W, C, 1, 1, L->conv_ws);
    conv2d_backward(dn, k->k.dw, k->k.db, dk, n, k->k.w, B, C, H, W, C, 1, 1, L->conv_ws);
    conv2d_backward(dn, k->v.dw, k->v.db, dv, n, k->v.w, B, C, H, W, C, 1, 1, L->conv_ws);
    groupnorm_backward(k->din, k->norm.dgamma, k->norm.dbeta, dn, k->in, k->norm.gamma, k->norm.beta,
                       k->mean, k->rstd, B, C, HW, m->cfg.groups, 0);
}

// Downsample: 3x3 conv, stride 2.  Upsample: nearest 2x, then 3x3 conv.
static void resample_forward(UNet* m, Block* k, int B) {
    int C = k->C_in, H = k->H, W = k->W;
    if (k->kind == BLOCK_DOWN)
        conv2d_forward(k->out, k->in, k->conv.w, k->conv.b, B, C, H, W, C, 3, 2, m->L->conv_ws);
    else
        upsample_conv_forward(k->out, k->in, k->conv.w, k->conv.b, B, C, H, W, C, m->L->conv_ws);
}

static void resample_backward(UNet* m, Block* k, int B) {
    int C = k->C_in, H = k->H, W = k->W;
    if (k->kind == BLOCK_DOWN)
        conv2d_backward(k->din, k->conv.dw, k->conv.db, k->dout, k->in, k->conv.w, B, C, H, W, C, 3, 2, m->L->conv_ws);
    else
        upsample_conv_backward(k->din, k->conv.dw, k->conv.db, k->dout, k->in, k->conv.w, B, C, H, W, C, m->L->conv_ws);
}

// ----------------------------------------------------------------------------
// 15. The layout (Appendix B: 35.7M parameters): presets, tensors, one buffer per role
//
// unet_layout walks the architecture of section 13 once to count every tensor, and once
// more to carve the views out of one buffer each: parameters (UNet.params, with the
// same layout in UNet.grads and in the trainer's Adam moments and EMA), saved
// activations, activation gradients, and the work space of one block.

// A preset: a network, and the run it trains when --batch, --steps, --warmup, --lr or
// --var-type are not given (its plan: batch, steps, warmup, lr, and sigma_t^2 to sample with).
typedef struct {
    const char* name;
    Config cfg;
    int any_side;   // grows a level per doubling of the image side (below)
    int batch;
    long steps;
    int warmup;
    float lr;
    VarType var;
} Preset;

// `paper` is the official CIFAR-10 model of Appendix B: 35.7M parameters, and its plan
// Appendix B's: 800k steps at batch 128, 5000 steps of warmup. `paper256` is the paper's
// model for LSUN and CelebA-HQ at 256x256 (§4, Table 1, Figs. 1, 3, 4): the official
// code's unet2d16b2c112244, six levels from 256x256 down to 8x8, attention at 16x16 only,
// no dropout, 113,673,219 parameters (the paper's "114M"); its plan is the official LSUN
// run's (scripts/run_lsun.py): batch 64, lr 2e-5 (the 256x256 runs were unstable at
// 2e-4), 1.2M steps (LSUN Church's; Appendix B: CelebA-HQ 0.5M, Bedroom 2.4M), sampled
// with sigma_t^2 = beta_tilde as the official code sampled these models. The two compact
// presets keep the CIFAR-10 model's shape (three levels, attention at 16x16) at a size a
// CPU can train in hours: tiny's 50,000 steps at batch 32 are about 3 hours on 2 cores
// of a Zen 5 (a night on a Zen 3), small's 15,000 about as long. Their shorter warmup
// (1000, a departure from Appendix B's 5000) lets the first previews show more than noise.
static const Preset PRESETS[] = {
    {"tiny",     {3, 32, 32, 3, {1, 2, 2}, 1, 1, {16}, 8, 0.1f, 0}, 1, 32, 50000, 1000, 2e-4f, VAR_FIXEDLARGE},
    {"small",    {3, 32, 64, 3, {1, 2, 2}, 1, 1, {16}, 32, 0.1f, 0}, 1, 32, 15000, 1000, 2e-4f, VAR_FIXEDLARGE},
    {"paper",    {3, 32, 128, 4, {1, 2, 2, 2}, 2, 1, {16}, 32, 0.1f, 0}, 0, 128, 800000, 5000, 2e-4f, VAR_FIXEDLARGE},
    {"paper256", {3, 256, 128, 6, {1, 1, 2, 2, 4, 4}, 2, 1, {16}, 32, 0.0f, 0}, 0, 64, 1200000, 5000, 2e-5f,
     VAR_FIXEDSMALL},
};
#define N_PRESETS (int)(sizeof(PRESETS) / sizeof(PRESETS[0]))

// The preset called name, or NULL.
static const Preset* preset_named(const char* name) {
    for (int i = 0; i < N_PRESETS; i++)
        if (!strcmp(PRESETS[i].name, name)) return &PRESETS[i];
    return NULL;
}

// At another image side (a folder of pictures, 16 to 256) tiny and small keep their shape:
// one level more per doubling, so the lowest resolution stays 8x8 (16: two levels, 256:
// six), each added level at the last multiplier, and attention stays at 16x16. The paper's
// two networks exist at their own side only. img 0 means the preset's own side. Returns
// 0 for an unknown name, -1 for a side the preset has no shape for.
static int preset_find(const char* name, int img, Config* out) {
    const Preset* p = preset_named(name);
    if (!p) return 0;
    Config c = p->cfg;
    if (img && img != c.img) {
        if (!p->any_side) return -1;
        int levels = 0;
        while ((8 << levels) < img) levels++;
        int last = c.ch_mult[c.n_levels - 1];
        for (int l = c.n_levels; l <= levels && l < MAX_LEVELS; l++) c.ch_mult[l] = last;
        c.n_levels = levels + 1 < MAX_LEVELS ? levels + 1 : MAX_LEVELS;
        c.img = img;
    }
    *out = c;
    return 1;
}

static int config_has_attn(const Config* c, int res) {
    for (int i = 0; i < c->n_attn; i++) if (c->attn_res[i] == res) return 1;
    return 0;
}

// What a refusal calls the configuration's fields: these words, or others the caller
// passes (Part IV passes the names of its flags).
typedef struct { const char *in_ch, *ch, *ch_mult, *num_res_blocks, *attn, *groups, *dropout; } ConfigWords;
static const ConfigWords CONFIG_WORDS = {"in_ch", "ch", "ch_mult", "num_res_blocks", "attn_resolutions",
                                         "groups", "dropout"};

// Returns NULL if the configuration is usable, else a one-line reason naming the field
// (w may be NULL).
static const char* config_check(const Config* c, const ConfigWords* w) {
    static char msg[256];
    if (!w) w = &CONFIG_WORDS;
    #define REFUSE(...) do { snprintf(msg, sizeof msg, __VA_ARGS__); return msg; } while (0)
    // The upper bounds keep every size below in range (and a corrupt checkpoint header
    // from asking for terabytes): 16 times the paper's channels, 4 times its depth.
    if (c->in_ch <= 0 || c->in_ch > 16) REFUSE("%s must be between 1 and 16", w->in_ch);
    if (c->learn_sigma != 0 && c->learn_sigma != 1) return "learn_sigma must be 0 or 1";
    if (c->ch <= 0 || c->ch % 2 || c->ch > 2048) REFUSE("%s must be an even number from 4 to 2048", w->ch);
    if (c->ch < 4) REFUSE("%s must be at least 4 (the sinusoidal embedding needs ch/2 >= 2)", w->ch);
    if (c->n_levels <= 0 || c->n_levels > MAX_LEVELS) REFUSE("%s needs 1 to %d levels", w->ch_mult, MAX_LEVELS);
    if (c->num_res_blocks <= 0 || c->num_res_blocks > 8) REFUSE("%s must be between 1 and 8", w->num_res_blocks);
    if (c->groups <= 0 || c->groups > c->ch) REFUSE("%s must be between 1 and %s", w->groups, w->ch);
    if (c->img > 256) return "the image side must be at most 256";
    if (c->dropout < 0 || c->dropout >= 1) REFUSE("%s must be in [0, 1)", w->dropout);
    if (c->img <= 0 || c->img % (1 << (c->n_levels - 1)))
        REFUSE("the image side must be divisible by 2^(levels-1): use fewer %s levels", w->ch_mult);
    if (c->ch % c->groups) REFUSE("%s %d is not divisible by %s %d", w->ch, c->ch, w->groups, c->groups);
    // every channel count of the net is a sum of multiples of ch, so ch % groups is
    // enough for all GroupNorms
    for (int i = 0; i < c->n_levels; i++)
        if (c->ch_mult[i] <= 0 || c->ch_mult[i] > 16) REFUSE("%s entries must be between 1 and 16", w->ch_mult);
    for (int a = 0; a < c->n_attn; a++) {
        int ok = 0;
        for (int i = 0; i < c->n_levels; i++) ok |= (c->img >> i) == c->attn_res[a];
        if (!ok)
            REFUSE("%s %d: the network never reaches %dx%d (resolutions are %d down to %d)", w->attn,
                   c->attn_res[a], c->attn_res[a], c->attn_res[a], c->img, c->img >> (c->n_levels - 1));
    }
    #undef REFUSE
    return NULL;
}

typedef struct { float* base; size_t used; } Arena;

// Carve n floats from an arena; on the sizing pass (base NULL) only count them.
static float* take(Arena* a, size_t n) {
    float* p = a->base ? a->base + a->used : NULL;
    a->used += n;
    return p;
}

// Register one parameter tensor; returns its view and sets *grad to its gradient view.
static float* param_add(UNet* m, Arena* P, float** grad, const char* group, const char* name,
                        int ndim, const int* shape, InitKind init, float bound) {
    if (m->L->n_tensors >= MAX_PARAM_TENSORS) die("too many parameter tensors; raise MAX_PARAM_TENSORS");
    ParamTensor* t = &m->L->tensors[m->L->n_tensors++];
    snprintf(t->name, sizeof t->name, "%s.%s", group, name);
    snprintf(t->group, sizeof t->group, "%s", group);
    t->ndim = ndim;
    t->numel = 1;
    for (int i = 0; i < ndim; i++) { t->shape[i] = shape[i]; t->numel *= shape[i]; }
    t->offset = P->used;
    t->init = init;
    t->bound = bound;
    float* p = take(P, t->numel);
    *grad = p ? m->grads + t->offset : NULL;
    return p;
}

// The official initialiser: variance scaling, fan_avg, uniform:
//   bound = sqrt(3 scale / ((fan_in + fan_out) / 2)); biases 0. scale is 1, except 1e-10
// for the last layer of every residual branch and the output conv, so that each block
// starts as (almost) the identity.
static float init_bound(float scale, int fan_in, int fan_out) {
    return sqrtf(3.0f * scale / ((fan_in + fan_out) / 2.0f));
}

static void conv_make(UNet* m, Arena* P, Conv2d* c, const char* group, const char* name,
                      int C_in, int C_out, int K, int stride, int H, float scale) {
    char n[48];
    size_t need = conv2d_workspace_floats(m->B_max, C_in, H, H, C_out, K, stride, kernel_threads);
    if (need > m->L->max_conv_ws) m->L->max_conv_ws = need;
    int ws[4] = {C_out, C_in, K, K}, bs[1] = {C_out};
    c->C_in = C_in; c->C_out = C_out; c->K = K; c->stride = stride;
    snprintf(n, sizeof n, "%s%sweight", name ? name : "", name ? "." : "");
    c->w = param_add(m, P, &c->dw, group, n, 4, ws, INIT_UNIFORM, init_bound(scale, C_in * K * K, C_out * K * K));
    snprintf(n, sizeof n, "%s%sbias", name ? name : "", name ? "." : "");
    c->b = param_add(m, P, &c->db, group, n, 1, bs, INIT_ZERO, 0);
}

static void linear_make(UNet* m, Arena* P, Linear* l, const char* group, const char* name, int C_in, int C_out) {
    char n[48];
    int ws[2] = {C_out, C_in}, bs[1] = {C_out};
    l->C_in = C_in; l->C_out = C_out;
    snprintf(n, sizeof n, "%s%sweight", name ? name : "", name ? "." : "");
    l->w = param_add(m, P, &l->dw, group, n, 2, ws, INIT_UNIFORM, init_bound(1.0f, C_in, C_out));
    snprintf(n, sizeof n, "%s%sbias", name ? name : "", name ? "." : "");
    l->b = param_add(m, P, &l->db, group, n, 1, bs, INIT_ZERO, 0);
}

static void groupnorm_make(UNet* m, Arena* P, GroupNorm* g, const char* group, const char* name, int C, int G) {
    char n[48];
    int s[1] = {C};
    g->C = C; g->G = G;
    snprintf(n, sizeof n, "%s%sweight", name ? name : "", name ? "." : "");
    g->gamma = param_add(m, P, &g->dgamma, group, n, 1, s, INIT_ONE, 0);
    snprintf(n, sizeof n, "%s%sbias", name ? name : "", name ? "." : "");
    g->beta = param_add(m, P, &g->dbeta, group, n, 1, s, INIT_ZERO, 0);
}

// ---- 15.1 The architecture: the official U-Net (diffusion_tf/models/unet.py), as code ----
// §4 and Appendix B: "a U-Net backbone similar to an unmasked PixelCNN++", four resolutions
// for CIFAR-10, six at 256x256, two residual blocks per level, self-attention at 16x16.
// Each block reads the output of the block before it (`in`; -1 is conv_in's, h0) and, on
// the up path, a skip: the output of a down-path block, which is therefore read twice
// (`kept`). Channels and sides follow from what the block reads.
#define FROM_CONV_IN (-1)
#define NO_SKIP (-2)

static int block_out_side(const UNet* m, int i) {   // the side of block i's output (-1: h0's)
    if (i == FROM_CONV_IN) return m->cfg.img;
    const Block* k = &m->L->blocks[i];
    return k->kind == BLOCK_DOWN ? k->H / 2 : k->kind == BLOCK_UP ? 2 * k->H : k->H;
}
static int block_out_channels(const UNet* m, int i) { return i == FROM_CONV_IN ? m->cfg.ch : m->L->blocks[i].C_out; }

// Appends a block of `kind` reading block `in` (and `skip`), with C_out channels out (0: as
// many as it reads: attention and resampling keep them); returns its index.
static int block_add(UNet* m, BlockKind kind, int in, int skip, int C_out, const char* fmt, int a, int b) {
    if (m->L->n_blocks >= MAX_BLOCKS) die("too many blocks; raise MAX_BLOCKS");
    Block* k = &m->L->blocks[m->L->n_blocks];
    memset(k, 0, sizeof *k);
    k->kind = kind;
    snprintf(k->name, sizeof k->name, fmt, a, b);
    k->src = in;
    k->skip_src = skip;
    k->C_in = block_out_channels(m, in);
    k->C_skip = skip == NO_SKIP ? 0 : block_out_channels(m, skip);
    k->C_out = C_out ? C_out : k->C_in;
    k->H = k->W = block_out_side(m, in);
    return m->L->n_blocks++;
}

static void unet_architecture(UNet* m) {
    const Config* c = &m->cfg;
    m->L->n_blocks = 0;
    int hs[4 * MAX_LEVELS * 8], n_hs = 0;   // the down path's outputs, for the up path's skips
    int h = FROM_CONV_IN;
    hs[n_hs++] = h;
    // Down path: num_res_blocks ResBlocks per level (attention after each at 16x16), then
    // a stride-2 conv to the next level; every output is kept for a skip connection.
    for (int i = 0; i < c->n_levels; i++) {
        for (int j = 0; j < c->num_res_blocks; j++) {
            h = block_add(m, BLOCK_RES, h, NO_SKIP, c->ch * c->ch_mult[i], "down.%d.block.%d", i, j);
            if (config_has_attn(c, block_out_side(m, h)))
                h = block_add(m, BLOCK_ATTN, h, NO_SKIP, 0, "down.%d.attn.%d", i, j);
            hs[n_hs++] = h;
        }
        if (i != c->n_levels - 1) hs[n_hs++] = h = block_add(m, BLOCK_DOWN, h, NO_SKIP, 0, "down.%d.downsample", i, 0);
    }
    // Middle: ResBlock, AttnBlock, ResBlock at the lowest resolution.
    h = block_add(m, BLOCK_RES, h, NO_SKIP, 0, "mid.block_1", 0, 0);
    h = block_add(m, BLOCK_ATTN, h, NO_SKIP, 0, "mid.attn_1", 0, 0);
    h = block_add(m, BLOCK_RES, h, NO_SKIP, 0, "mid.block_2", 0, 0);
    // Up path: num_res_blocks + 1 ResBlocks per level, each on concat(h, skip), then nearest
    // 2x and a conv to the next level.
    for (int i = c->n_levels - 1; i >= 0; i--) {
        for (int j = 0; j < c->num_res_blocks + 1; j++) {
            int skip = hs[--n_hs];
            if (skip != FROM_CONV_IN) m->L->blocks[skip].kept = 1;
            h = block_add(m, BLOCK_RES, h, skip, c->ch * c->ch_mult[i], "up.%d.block.%d", i, j);
            if (config_has_attn(c, block_out_side(m, h)))
                h = block_add(m, BLOCK_ATTN, h, NO_SKIP, 0, "up.%d.attn.%d", i, j);
        }
        if (i != 0) h = block_add(m, BLOCK_UP, h, NO_SKIP, 0, "up.%d.upsample", i, 0);
    }
    // Out: GroupNorm, SiLU and a 3x3 conv from the last block's output (unet_layout).
}

// ---- 15.2 The buffers: every block's parameters, saved activations and gradients ----
// A block's output is read by the next block alone, right after it is written, so its
// gradient can live in one of two ping-pong buffers (consecutive ones alternate); a kept
// output (and h0) is read twice, so its gradient has a buffer of its own and sums both.
typedef struct { Arena P, A, G; } Arenas;

static void block_buffers(UNet* m, Arenas* ar, Block* k) {
    int C_x = k->C_in + k->C_skip, C = k->C_out, G = m->cfg.groups, H = k->H, HW = H * H, Bm = m->B_max;
    if (k->kind == BLOCK_RES) {
        groupnorm_make(m, &ar->P, &k->norm1, k->name, "norm1", C_x, G);
        conv_make(m, &ar->P, &k->conv1, k->name, "conv1", C_x, C, 3, 1, H, 1.0f);
        linear_make(m, &ar->P, &k->temb_proj, k->name, "temb_proj", 4 * m->cfg.ch, C);
        groupnorm_make(m, &ar->P, &k->norm2, k->name, "norm2", C, G);
        conv_make(m, &ar->P, &k->conv2, k->name, "conv2", C, C, 3, 1, H, 1e-10f);
        if (C_x != C) conv_make(m, &ar->P, &k->nin_shortcut, k->name, "nin_shortcut", C_x, C, 1, 1, H, 1.0f);
        k->mean1 = take(&ar->A, Bm * G); k->rstd1 = take(&ar->A, Bm * G);
        k->mean2 = take(&ar->A, Bm * G); k->rstd2 = take(&ar->A, Bm * G);
        k->h1 = take(&ar->A, (size_t)Bm * C * HW);
        k->a1 = take(&ar->A, (size_t)Bm * C_x * conv_input_floats(H, H));   // written as conv1's grids
        k->a2 = take(&ar->A, (size_t)Bm * C * conv_input_floats(H, H));     // written as conv2's grids
    } else if (k->kind == BLOCK_ATTN) {
        groupnorm_make(m, &ar->P, &k->norm, k->name, "norm", C, G);
        conv_make(m, &ar->P, &k->q, k->name, "q", C, C, 1, 1, H, 1.0f);
        conv_make(m, &ar->P, &k->k, k->name, "k", C, C, 1, 1, H, 1.0f);
        conv_make(m, &ar->P, &k->v, k->name, "v", C, C, 1, 1, H, 1.0f);
        conv_make(m, &ar->P, &k->proj_out, k->name, "proj_out", C, C, 1, 1, H, 1e-10f);
        k->mean = take(&ar->A, Bm * G); k->rstd = take(&ar->A, Bm * G);
        k->qa = take(&ar->A, (size_t)Bm * C * HW); k->ka = take(&ar->A, (size_t)Bm * C * HW);
        k->va = take(&ar->A, (size_t)Bm * C * HW); k->o = take(&ar->A, (size_t)Bm * C * HW);
        k->att = take(&ar->A, (size_t)Bm * HW * HW);
        if (HW > m->L->max_attn_hw) m->L->max_attn_hw = HW;
    } else {   // Downsample (stride-2 conv) and Upsample (nearest 2x, then conv), both C -> C
        int down = k->kind == BLOCK_DOWN;
        conv_make(m, &ar->P, &k->conv, k->name, "conv", C, C, 3, down ? 2 : 1, down ? H : 2 * H, 1.0f);
        if (!down) {   // the upsampling conv needs its own scratch
            size_t need = upsample_conv_workspace_floats(Bm, C, H, H, C, kernel_threads);
            if (need > m->L->max_conv_ws) m->L->max_conv_ws = need;
        }
    }
    int H_out = block_out_side(m, (int)(k - m->L->blocks));
    size_t numel = (size_t)C * H_out * H_out;
    k->out = take(&ar->A, Bm * numel);
    k->dout = k->kept ? take(&ar->G, Bm * numel) : m->L->ping[m->L->n_transient++ % 2];
    if (numel > m->L->max_numel) m->L->max_numel = numel;
    if ((size_t)C_x * HW > m->L->max_numel) m->L->max_numel = (size_t)C_x * HW;   // a concatenated input
}

// The parameters and buffers, in the order of the official model's variables: the timestep
// MLP, conv_in, the blocks, the output. Run once to count (arenas without a base) and once
// to carve.
static void unet_layout(UNet* m, Arenas* ar) {
    UNetLayers* L = m->L;
    const Config* c = &m->cfg;
    int Bm = m->B_max, ch = c->ch, E = 4 * ch, S = c->img, G = c->groups;
    L->n_tensors = L->n_transient = 0;
    // timestep embedding: sinusoid -> dense0 -> silu -> dense1 (-> silu in every ResBlock)
    linear_make(m, &ar->P, &L->dense0, "temb", "dense0", ch, E);
    linear_make(m, &ar->P, &L->dense1, "temb", "dense1", E, E);
    L->temb_sin = take(&ar->A, (size_t)Bm * ch);
    L->temb_h = take(&ar->A, (size_t)Bm * E); L->temb_a = take(&ar->A, (size_t)Bm * E);
    L->temb = take(&ar->A, (size_t)Bm * E); L->temb_act = take(&ar->A, (size_t)Bm * E);
    L->d_temb_act = take(&ar->G, (size_t)Bm * E); L->d_temb = take(&ar->G, (size_t)Bm * E);
    L->d_temb_a = take(&ar->G, (size_t)Bm * E); L->d_temb_h = take(&ar->G, (size_t)Bm * E);
    L->x = take(&ar->A, (size_t)Bm * c->in_ch * S * S);
    conv_make(m, &ar->P, &L->conv_in, "conv_in", NULL, c->in_ch, ch, 3, 1, S, 1.0f);
    L->h0 = take(&ar->A, (size_t)Bm * ch * S * S);   // read by the first block and the last skip
    L->d_h0 = take(&ar->G, (size_t)Bm * ch * S * S);
    if ((size_t)ch * S * S > L->max_numel) L->max_numel = (size_t)ch * S * S;
    for (int i = 0; i < L->n_blocks; i++) {
        Block* k = &L->blocks[i];
        block_buffers(m, ar, k);
        const Block* src = k->src == FROM_CONV_IN ? NULL : &L->blocks[k->src];
        k->in = src ? src->out : L->h0;
        k->din = src ? src->dout : L->d_h0;
        k->din_transient = src && !src->kept;
        if (k->skip_src != NO_SKIP) {
            const Block* sk = k->skip_src == FROM_CONV_IN ? NULL : &L->blocks[k->skip_src];
            k->skip = sk ? sk->out : L->h0;
            k->dskip = sk ? sk->dout : L->d_h0;
        }
    }
    // Out: GroupNorm, SiLU, 3x3 conv to the image channels, from the last up block's
    // ch * ch_mult[0] channels (as the official model; ch when ch_mult[0] = 1).
    const Block* last = &L->blocks[L->n_blocks - 1];
    L->h_last = last->out;
    L->d_h_last = last->dout;
    groupnorm_make(m, &ar->P, &L->norm_out, "norm_out", NULL, last->C_out, G);
    conv_make(m, &ar->P, &L->conv_out, "conv_out", NULL, last->C_out, out_channels(c), 3, 1, S, 1e-10f);
    L->mean_out = take(&ar->A, (size_t)Bm * G); L->rstd_out = take(&ar->A, (size_t)Bm * G);
    L->a_out = take(&ar->A, (size_t)Bm * last->C_out * conv_input_floats(S, S));
    L->eps_theta = take(&ar->A, (size_t)Bm * out_channels(c) * S * S);
}

// The network's plan: the sizing pass of unet_layout alone, which allocates nothing but
// the small layer table m->L (every tensor's name, shape and offset; free(m->L) frees it)
// and counts the parameters and activations. What a file claims is checked against it
// before any buffer is built for the claim.
static void unet_plan(UNet* m, const Config* cfg, int B_max) {
    memset(m, 0, sizeof *m);
    m->cfg = *cfg;
    m->B_max = B_max;
    m->L = calloc_check(1, sizeof *m->L, "the network's layers");
    layers_init();
    unet_architecture(m);
    Arenas sizing = {{NULL, 0}, {NULL, 0}, {NULL, 0}};
    unet_layout(m, &sizing);
    m->n_params = sizing.P.used;
    m->L->n_acts = sizing.A.used;
    m->L->n_grad_acts = sizing.G.used;
    // the work buffer (carved by unet_build): N_SCRATCH + 2 tensors, the largest layer's
    // scratch, attention's (HW, HW) per thread, and a timestep projection
    size_t per = (size_t)B_max * m->L->max_numel;
    size_t att = (size_t)kernel_threads * m->L->max_attn_hw * m->L->max_attn_hw;
    int max_mult = 1;
    for (int i = 0; i < cfg->n_levels; i++) if (cfg->ch_mult[i] > max_mult) max_mult = cfg->ch_mult[i];
    m->L->n_work = (N_SCRATCH + 2) * per + m->L->max_conv_ws + att + (size_t)B_max * cfg->ch * max_mult;
}

// Build the network for batches of up to B_max images: size everything, allocate each
// buffer once, then carve the named views. Nothing is allocated after this.
static void unet_build(UNet* m, const Config* cfg, int B_max) {
    const char* err = config_check(cfg, NULL);
    if (err) die("%s", err);
    unet_plan(m, cfg, B_max);
    UNetLayers* L = m->L;
    size_t per = (size_t)B_max * L->max_numel;
    size_t att = (size_t)kernel_threads * L->max_attn_hw * L->max_attn_hw;   // datt, per thread
    m->params = calloc_check(m->n_params, sizeof(float), "parameters");
    m->grads = calloc_check(m->n_params, sizeof(float), "gradients");
    L->acts = calloc_check(L->n_acts, sizeof(float), "activations");
    L->grad_acts = calloc_check(L->n_grad_acts, sizeof(float), "activation gradients");
    L->work = calloc_check(L->n_work, sizeof(float), "work buffers");
    float* w = L->work;
    for (int i = 0; i < N_SCRATCH; i++, w += per) L->scratch[i] = w;
    L->ping[0] = w; w += per;
    L->ping[1] = w; w += per;
    L->conv_ws = w; w += L->max_conv_ws;
    L->datt = w; w += att;
    L->tproj = w;
    Arenas carve = {{m->params, 0}, {L->acts, 0}, {L->grad_acts, 0}};
    unet_layout(m, &carve);
}

// The parameter count of a configuration from the plan alone: a checkpoint's header is
// checked with it before any buffer is built for what the header claims.
static size_t unet_count_params(const Config* cfg) {
    UNet m;
    unet_plan(&m, cfg, 1);
    free(m.L);
    return m.n_params;
}

static void unet_free(UNet* m) {
    free(m->params); free(m->grads); free(m->L->acts); free(m->L->grad_acts); free(m->L->work); free(m->L);
}

// Official initialisation (see init_bound), drawn in the order of tensors[].
static void unet_init(UNet* m, Rng* rng) {
    for (int i = 0; i < m->L->n_tensors; i++) {
        ParamTensor* t = &m->L->tensors[i];
        float* p = m->params + t->offset;
        for (size_t j = 0; j < t->numel; j++)
            p[j] = t->init == INIT_ONE ? 1.0f : t->init == INIT_ZERO ? 0.0f
                 : (float)((2.0 * rng_uniform(rng) - 1.0) * t->bound);
    }
}

// ----------------------------------------------------------------------------
// 16. The layers: plain reference implementations
//
// "The algorithmic reference", as llm.c calls the naive matmul it keeps beside its tuned
// one: loops that can be checked against the formula above them, forward beside
// backward, serial, with long sums in double. They are what -DDDPM_PLAIN runs and what
// gdb steps through in `make debug`; tests/ checks every kernel of Part III against them,
// and the PyTorch comparison runs on both builds.


static void layers_init(void) { FAST(layers_init_fast()); kernel_threads = max_threads(); }

// ---- 16.1 Convolution: conv2d_forward / conv2d_backward ----
// The U-Net of §4 / Appendix B is built of 3x3 convolutions (1x1 for shortcuts and
// attention, and 3x3 stride 2 to downsample). Padding is TensorFlow's "SAME", as in the
// official model: stride 1 pads K/2 on every side; stride 2 (on an even input) pads 0
// on the top/left and 1 on the bottom/right.
//   out[b, o, y, x] = bias[o] + sum_{c, i, j} weight[o, c, i, j] inp[b, c, s y + i - pad, s x + j - pad]
// with inputs outside the image read as 0.
static int conv_pad(int K, int stride) { return stride == 1 ? K / 2 : 0; }

// The outputs o in [*lo, *hi) whose input stride o + tap - pad lies in [0, n_in): the
// rows (or columns) where tap i (or j) of the kernel falls inside the image.
static void conv_range(int* lo, int* hi, int n_out, int n_in, int tap, int stride, int pad) {
    *lo = 0;
    *hi = n_out;
    while (*lo < n_out && stride * *lo + tap - pad < 0) (*lo)++;
    while (*hi > *lo && stride * (*hi - 1) + tap - pad >= n_in) (*hi)--;
}

static size_t conv2d_workspace_floats(int B, int C_in, int H, int W, int C_out, int K, int stride, int threads) {
    FAST_RETURN(conv2d_workspace_floats_fast(B, C_in, H, W, C_out, K, stride, threads));
    (void)B; (void)C_in; (void)H; (void)W; (void)C_out; (void)K; (void)stride; (void)threads;
    return 0;
}

static void conv2d_forward(float* out, const float* inp, const float* weight, const float* bias,
                               int B, int C_in, int H, int W, int C_out, int K, int stride, float* ws) {
    FAST(conv2d_forward_fast(out, inp, weight, bias, B, C_in, H, W, C_out, K, stride, ws));
    (void)ws;
    int Ho = H / stride, Wo = W / stride, pad = conv_pad(K, stride);
    for (int b = 0; b < B; b++)
        for (int o = 0; o < C_out; o++) {
            float* y = out + ((size_t)b * C_out + o) * Ho * Wo;
            for (int p = 0; p < Ho * Wo; p++) y[p] = bias[o];
            for (int c = 0; c < C_in; c++)   // each weight adds a shifted copy of an input plane
                for (int i = 0; i < K; i++)
                    for (int j = 0; j < K; j++) {
                        float w = weight[(((size_t)o * C_in + c) * K + i) * K + j];
                        const float* x = inp + ((size_t)b * C_in + c) * H * W;
                        int y0, y1, x0, x1;
                        conv_range(&y0, &y1, Ho, H, i, stride, pad);
                        conv_range(&x0, &x1, Wo, W, j, stride, pad);
                        for (int oy = y0; oy < y1; oy++)
                            for (int ox = x0; ox < x1; ox++)
                                y[oy * Wo + ox] += w * x[(stride * oy + i - pad) * W + stride * ox + j - pad];
                    }
        }
}

// Each term weight[o, c, i, j] inp[b, c, iy, ix] of the forward sum sends dout[b, o, oy, ox]
// back to both of its factors, and the bias receives every dout of its channel:
//   dinp[b, c, iy, ix] += weight[o, c, i, j] dout[b, o, oy, ox]
//   dweight[o, c, i, j] += sum_{b, oy, ox} inp[b, c, iy, ix] dout[b, o, oy, ox]
//   dbias[o] += sum_{b, oy, ox} dout[b, o, oy, ox]
static void conv2d_backward(float* dinp, float* dweight, float* dbias, const float* dout,
                                const float* inp, const float* weight,
                                int B, int C_in, int H, int W, int C_out, int K, int stride, float* ws) {
    FAST(conv2d_backward_fast(dinp, dweight, dbias, dout, inp, weight, B, C_in, H, W, C_out, K, stride, ws));
    (void)ws;
    int Ho = H / stride, Wo = W / stride, pad = conv_pad(K, stride);
    for (int o = 0; o < C_out; o++) {
        double sb = 0;
        for (int b = 0; b < B; b++)
            for (int p = 0; p < Ho * Wo; p++) sb += dout[((size_t)b * C_out + o) * Ho * Wo + p];
        dbias[o] += (float)sb;
        for (int c = 0; c < C_in; c++)
            for (int i = 0; i < K; i++)
                for (int j = 0; j < K; j++) {
                    double sw = 0;
                    float w = weight[(((size_t)o * C_in + c) * K + i) * K + j];
                    int y0, y1, x0, x1;
                    conv_range(&y0, &y1, Ho, H, i, stride, pad);
                    conv_range(&x0, &x1, Wo, W, j, stride, pad);
                    for (int b = 0; b < B; b++) {
                        const float* x = inp + ((size_t)b * C_in + c) * H * W;
                        const float* dy = dout + ((size_t)b * C_out + o) * Ho * Wo;
                        float* dx = dinp ? dinp + ((size_t)b * C_in + c) * H * W : NULL;
                        for (int oy = y0; oy < y1; oy++)
                            for (int ox = x0; ox < x1; ox++) {
                                size_t xi = (size_t)(stride * oy + i - pad) * W + stride * ox + j - pad;
                                sw += (double)x[xi] * dy[oy * Wo + ox];
                                if (dx) dx[xi] += w * dy[oy * Wo + ox];
                            }
                    }
                    dweight[(((size_t)o * C_in + c) * K + i) * K + j] += (float)sw;
                }
    }
}

// A channel of the input of a 3x3 conv, kept for the backward pass (section 14): H W floats,
// plain. (Part III keeps it as the zero-bordered grid its convolution reads.)
static size_t conv_input_floats(int H, int W) { FAST_RETURN(conv_input_floats_fast(H, W)); return (size_t)H * W; }

// ---- 16.2 Linear: linear_forward / linear_backward ----
//   out[b, o] = bias[o] + sum_i inp[b, i] weight[o, i]
static void linear_forward(float* out, const float* inp, const float* weight, const float* bias,
                               int B, int C_in, int C_out) {
    FAST(linear_forward_fast(out, inp, weight, bias, B, C_in, C_out));
    for (int b = 0; b < B; b++)
        for (int o = 0; o < C_out; o++) {
            double s = bias[o];
            for (int i = 0; i < C_in; i++) s += (double)inp[(size_t)b * C_in + i] * weight[(size_t)o * C_in + i];
            out[(size_t)b * C_out + o] = (float)s;
        }
}

//   dinp[b, i] += sum_o dout[b, o] weight[o, i],  dweight[o, i] += sum_b dout[b, o] inp[b, i],
//   dbias[o] += sum_b dout[b, o]
static void linear_backward(float* dinp, float* dweight, float* dbias, const float* dout,
                                const float* inp, const float* weight, int B, int C_in, int C_out) {
    FAST(linear_backward_fast(dinp, dweight, dbias, dout, inp, weight, B, C_in, C_out));
    for (int o = 0; o < C_out; o++) {
        double sb = 0;
        for (int b = 0; b < B; b++) sb += dout[(size_t)b * C_out + o];
        dbias[o] += (float)sb;
        for (int i = 0; i < C_in; i++) {
            double sw = 0;
            for (int b = 0; b < B; b++) sw += (double)dout[(size_t)b * C_out + o] * inp[(size_t)b * C_in + i];
            dweight[(size_t)o * C_in + i] += (float)sw;
        }
    }
    if (dinp)
        for (int b = 0; b < B; b++)
            for (int i = 0; i < C_in; i++) {
                double s = 0;
                for (int o = 0; o < C_out; o++) s += (double)dout[(size_t)b * C_out + o] * weight[(size_t)o * C_in + i];
                dinp[(size_t)b * C_in + i] += (float)s;
            }
}

// ---- 16.3 SiLU: silu_forward / silu_backward ----
// The official code's nonlinearity, swish: silu(x) = x sigmoid(x).
static float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

static void silu_forward(float* out, const float* inp, size_t N) {
    FAST(silu_forward_fast(out, inp, N));
    for (size_t i = 0; i < N; i++) out[i] = inp[i] * sigmoid(inp[i]);
}

// d silu / dx = s + x s (1 - s) = s (1 + x (1 - s)),  s = sigmoid(x)
static float silu_derivative(float x) {
    float s = sigmoid(x);
    return s * (1.0f + x * (1.0f - s));
}

static void silu_backward(float* dinp, const float* dout, const float* inp, size_t N) {
    FAST(silu_backward_fast(dinp, dout, inp, N));
    for (size_t i = 0; i < N; i++) dinp[i] += dout[i] * silu_derivative(inp[i]);
}

// ---- 16.4 GroupNorm (+ SiLU): groupnorm_forward / groupnorm_backward ----
// "group normalization throughout" (§4; Wu & He 2018): the C channels are split into G
// groups of C/G, and each (image, group), C/G x HW values, is normalised by its own
// mean and variance, then scaled and shifted per channel:
//   xhat = (x - mean) rstd,  rstd = 1 / sqrt(var + 1e-6),  n = gamma_c xhat + beta_c,
//   out = silu(n) if silu, else n.
// In the U-Net every GroupNorm but the attention's is followed by SiLU, hence the flag.
// In NCHW the values of one (image, group) are contiguous: x = inp + (b G + g) (C/G) HW.
#define GN_EPS 1e-6

static void groupnorm_forward(float* out, float* mean, float* rstd, const float* inp,
                                  const float* gamma, const float* beta, int B, int C, int HW, int G, int silu) {
    FAST(groupnorm_forward_fast(out, mean, rstd, inp, gamma, beta, B, C, HW, G, silu));
    int Cg = C / G;
    size_t n = (size_t)Cg * HW;
    for (int bg = 0; bg < B * G; bg++) {
        const float* x = inp + (size_t)bg * n;
        float* y = out + (size_t)bg * n;
        double s = 0, ss = 0;
        for (size_t i = 0; i < n; i++) s += x[i];
        double mu = s / n;
        for (size_t i = 0; i < n; i++) ss += (x[i] - mu) * (x[i] - mu);
        mean[bg] = (float)mu;
        rstd[bg] = (float)(1.0 / sqrt(ss / n + GN_EPS));
        for (int cg = 0; cg < Cg; cg++) {
            int c = (bg % G) * Cg + cg;
            for (int i = 0; i < HW; i++) {
                float v = gamma[c] * (x[cg * HW + i] - mean[bg]) * rstd[bg] + beta[c];
                y[cg * HW + i] = silu ? v * sigmoid(v) : v;
            }
        }
    }
}

// With dn = dout silu'(n) (or dout, without the SiLU), per (image, group):
//   dbeta_c += sum dn,  dgamma_c += sum dn xhat,  dxhat = dn gamma_c,
//   dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)), the means over the group
// (mean and rstd depend on every x of the group: the last two terms are their share).
static void groupnorm_backward(float* dinp, float* dgamma, float* dbeta, const float* dout,
                                   const float* inp, const float* gamma, const float* beta,
                                   const float* mean, const float* rstd, int B, int C, int HW, int G, int silu) {
    FAST(groupnorm_backward_fast(dinp, dgamma, dbeta, dout, inp, gamma, beta, mean, rstd, B, C, HW, G, silu));
    int Cg = C / G;
    size_t n = (size_t)Cg * HW;
    for (int bg = 0; bg < B * G; bg++) {
        const float *x = inp + (size_t)bg * n, *dy = dout + (size_t)bg * n;
        float m = mean[bg], r = rstd[bg];
        double sum_dxhat = 0, sum_dxhat_xhat = 0;
        for (int pass = 0; pass < 2; pass++)
            for (int cg = 0; cg < Cg; cg++) {
                int c = (bg % G) * Cg + cg;
                double sdn = 0, sdn_xhat = 0;
                for (int i = 0; i < HW; i++) {
                    float xhat = (x[cg * HW + i] - m) * r, v = gamma[c] * xhat + beta[c];
                    float dn = silu ? dy[cg * HW + i] * silu_derivative(v) : dy[cg * HW + i];
                    if (pass == 0) { sdn += dn; sdn_xhat += (double)dn * xhat; continue; }
                    dinp[(size_t)bg * n + cg * HW + i] +=
                        r * (float)(dn * gamma[c] - sum_dxhat / n - xhat * sum_dxhat_xhat / n);
                }
                if (pass == 1) continue;
                dbeta[c] += (float)sdn;
                dgamma[c] += (float)sdn_xhat;
                sum_dxhat += sdn * gamma[c];
                sum_dxhat_xhat += sdn_xhat * gamma[c];
            }
    }
}

// ---- 16.5 Dropout: dropout_forward / dropout_backward ----
// "dropout 0.1" on CIFAR-10 (Appendix B), inside each ResBlock. Inverted dropout: keep
// each value with probability 1 - p and scale it by 1/(1 - p), so that nothing changes
// at evaluation. The mask is never stored: element i is kept iff hash(key, i) >= p 2^32,
// so the backward pass rebuilds it from the same key. In place is allowed.
static int dropout_keep(uint64_t key, size_t i, float p) {
    return hash_u32(key, i) >= (uint32_t)(p * 4294967296.0);
}

static void dropout_forward(float* out, const float* inp, size_t N, float p, uint64_t key) {
    float scale = 1.0f / (1.0f - p);
    for (size_t i = 0; i < N; i++) out[i] = dropout_keep(key, i, p) ? inp[i] * scale : 0.0f;
}

static void dropout_backward(float* dinp, const float* dout, size_t N, float p, uint64_t key) {
    float scale = 1.0f / (1.0f - p);
    #pragma omp parallel for schedule(static) if (N > 65536)
    for (size_t i = 0; i < N; i++) if (dropout_keep(key, i, p)) dinp[i] += dout[i] * scale;
}

// ---- 16.6 Attention: attention_forward / attention_backward ----
// §4: "self-attention at the 16 x 16 feature map resolution". The core of the official
// AttnBlock (a non-local / self-attention layer over the N = H W positions of each image),
// given q, k, v of shape (B, C, N):
//   att[i, j] = softmax_j( sum_c q[c, i] k[c, j] / sqrt(C) ),   out[c, i] = sum_j att[i, j] v[c, j]
// att (B, N, N), att[i, j] at i N + j, is saved for the backward pass (NULL: it goes to
// scratch, N x N floats).
static void attention_forward(float* out, float* att, const float* q, const float* k, const float* v,
                              int B, int C, int N, float* scratch) {
    FAST(attention_forward_fast(out, att, q, k, v, B, C, N, scratch));
    double scale = 1.0 / sqrt((double)C);
    for (int b = 0; b < B; b++) {
        const float *qb = q + (size_t)b * C * N, *kb = k + (size_t)b * C * N, *vb = v + (size_t)b * C * N;
        float* a = att ? att + (size_t)b * N * N : scratch;
        for (int i = 0; i < N; i++) {
            float* ai = a + (size_t)i * N;   // row i: the weights position i gives every j
            double mx = -INFINITY, sum = 0;
            for (int j = 0; j < N; j++) {
                double s = 0;
                for (int c = 0; c < C; c++) s += (double)qb[c * N + i] * kb[c * N + j];
                ai[j] = (float)(s * scale);
                mx = fmax(mx, s * scale);
            }
            for (int j = 0; j < N; j++) sum += exp(ai[j] - mx);
            for (int j = 0; j < N; j++) ai[j] = (float)(exp(ai[j] - mx) / sum);
        }
        for (int c = 0; c < C; c++)
            for (int i = 0; i < N; i++) {
                double s = 0;
                for (int j = 0; j < N; j++) s += (double)a[(size_t)i * N + j] * vb[c * N + j];
                out[(size_t)b * C * N + c * N + i] = (float)s;
            }
    }
}

// With datt[i, j] = sum_c dout[c, i] v[c, j] and the softmax's backward
//   ds[i, j] = att[i, j] (datt[i, j] - sum_j' att[i, j'] datt[i, j']) / sqrt(C):
//   dv[c, j] += sum_i att[i, j] dout[c, i],  dq[c, i] += sum_j ds[i, j] k[c, j],
//   dk[c, j] += sum_i ds[i, j] q[c, i].   scratch: N x N floats, for ds.
static void attention_backward(float* dq, float* dk, float* dv, const float* dout,
                               const float* q, const float* k, const float* v, const float* att,
                               int B, int C, int N, float* scratch) {
    FAST(attention_backward_fast(dq, dk, dv, dout, q, k, v, att, B, C, N, scratch));
    double scale = 1.0 / sqrt((double)C);
    float* ds = scratch;   // ds[i, j] at i N + j
    for (int b = 0; b < B; b++) {
        size_t o = (size_t)b * C * N;
        const float* a = att + (size_t)b * N * N;
        for (int c = 0; c < C; c++)
            for (int j = 0; j < N; j++) {
                double s = 0;
                for (int i = 0; i < N; i++) s += (double)a[(size_t)i * N + j] * dout[o + c * N + i];
                dv[o + c * N + j] += (float)s;
            }
        for (int i = 0; i < N; i++) {
            double dot = 0;
            for (int j = 0; j < N; j++) {
                double datt = 0;
                for (int c = 0; c < C; c++) datt += (double)dout[o + c * N + i] * v[o + c * N + j];
                ds[(size_t)i * N + j] = (float)datt;
                dot += a[(size_t)i * N + j] * datt;
            }
            for (int j = 0; j < N; j++)
                ds[(size_t)i * N + j] = (float)(a[(size_t)i * N + j] * (ds[(size_t)i * N + j] - dot) * scale);
        }
        for (int c = 0; c < C; c++)
            for (int i = 0; i < N; i++) {
                double s = 0;
                for (int j = 0; j < N; j++) s += (double)ds[(size_t)i * N + j] * k[o + c * N + j];
                dq[o + c * N + i] += (float)s;
            }
        for (int c = 0; c < C; c++)
            for (int j = 0; j < N; j++) {
                double s = 0;
                for (int i = 0; i < N; i++) s += (double)ds[(size_t)i * N + j] * q[o + c * N + i];
                dk[o + c * N + j] += (float)s;
            }
    }
}

// ---- 16.7 Upsampling: upsample_forward / upsample_backward, and the official Upsample ----
// Nearest neighbour, 2x: up[c, y, x] = inp[c, y/2, x/2] (integer division). Backward:
// each input pixel receives the gradients of the 2 x 2 block it was copied to.
static void upsample_forward(float* up, const float* inp, int BC, int H, int W) {
    for (int bc = 0; bc < BC; bc++)
        for (int y = 0; y < 2 * H; y++)
            for (int x = 0; x < 2 * W; x++)
                up[((size_t)bc * 2 * H + y) * 2 * W + x] = inp[((size_t)bc * H + y / 2) * W + x / 2];
}

static void upsample_backward(float* dinp, const float* dup, int BC, int H, int W) {
    for (int bc = 0; bc < BC; bc++)
        for (int y = 0; y < 2 * H; y++)
            for (int x = 0; x < 2 * W; x++)
                dinp[((size_t)bc * H + y / 2) * W + x / 2] += dup[((size_t)bc * 2 * H + y) * 2 * W + x];
}

// The official Upsample: out = conv3x3(upsample(inp)). ws holds the upsampled input
// and (backward) its gradient, B C_in 2H 2W floats each.
static size_t upsample_conv_workspace_floats(int B, int C_in, int H, int W, int C_out, int threads) {
    FAST_RETURN(upsample_conv_workspace_floats_fast(B, C_in, H, W, C_out, threads));
    (void)C_out; (void)threads;
    return 2 * (size_t)B * C_in * 4 * H * W;
}

static void upsample_conv_forward(float* out, const float* inp, const float* weight, const float* bias,
                                      int B, int C_in, int H, int W, int C_out, float* ws) {
    FAST(upsample_conv_forward_fast(out, inp, weight, bias, B, C_in, H, W, C_out, ws));
    upsample_forward(ws, inp, B * C_in, H, W);
    conv2d_forward(out, ws, weight, bias, B, C_in, 2 * H, 2 * W, C_out, 3, 1, NULL);
}

static void upsample_conv_backward(float* dinp, float* dweight, float* dbias, const float* dout,
                                       const float* inp, const float* weight, int B, int C_in, int H, int W,
                                       int C_out, float* ws) {
    FAST(upsample_conv_backward_fast(dinp, dweight, dbias, dout, inp, weight, B, C_in, H, W, C_out, ws));
    size_t n_up = (size_t)B * C_in * 4 * H * W;
    float *up = ws, *dup = ws + n_up;
    upsample_forward(up, inp, B * C_in, H, W);
    memset(dup, 0, n_up * sizeof(float));
    conv2d_backward(dinp ? dup : NULL, dweight, dbias, dout, up, weight, B, C_in, 2 * H, 2 * W, C_out, 3, 1, NULL);
    if (dinp) upsample_backward(dinp, dup, B * C_in, H, W);
}

// ---- 16.8 Channel concatenation: concat_forward / concat_backward ----
// The U-Net's skip connections: out (B, Ca + Cb, HW) = [a ; b] along channels.
static void concat_forward(float* out, const float* a, const float* b, int B, int Ca, int Cb, int HW) {
    #pragma omp parallel for schedule(static) if ((size_t)B * (Ca + Cb) * HW > 65536)
    for (int i = 0; i < B; i++) {
        memcpy(out + (size_t)i * (Ca + Cb) * HW, a + (size_t)i * Ca * HW, (size_t)Ca * HW * sizeof(float));
        memcpy(out + ((size_t)i * (Ca + Cb) + Ca) * HW, b + (size_t)i * Cb * HW, (size_t)Cb * HW * sizeof(float));
    }
}

static void concat_backward(float* da, float* db, const float* dout, int B, int Ca, int Cb, int HW) {
    #pragma omp parallel for schedule(static) if ((size_t)B * (Ca + Cb) * HW > 65536)
    for (int i = 0; i < B; i++) {
        const float* d = dout + (size_t)i * (Ca + Cb) * HW;
        for (size_t j = 0; j < (size_t)Ca * HW; j++) da[(size_t)i * Ca * HW + j] += d[j];
        for (size_t j = 0; j < (size_t)Cb * HW; j++) db[(size_t)i * Cb * HW + j] += d[(size_t)Ca * HW + j];
    }
}

// ---- 16.9 The timestep embedding (§4: "the Transformer sinusoidal position embedding") ----
// emb[b] = [sin(t_b f_0) .. sin(t_b f_{h-1}), cos(t_b f_0) .. cos(t_b f_{h-1})], h = dim/2,
// f_i = exp(-ln(10000) i / (h - 1)). t is the 0-based index, as in the official code.
// No backward: t is an integer input. Computed in double: t f_i reaches 10^3 radians,
// where float arguments would already be off by ~1e-4.
static void timestep_embedding(float* out, const int* t_idx, int B, int dim) {
    int half = dim / 2;
    for (int b = 0; b < B; b++)
        for (int i = 0; i < half; i++) {
            double arg = t_idx[b] * exp(-log(10000.0) * i / (half - 1));
            out[(size_t)b * dim + i] = (float)sin(arg);
            out[(size_t)b * dim + half + i] = (float)cos(arg);
        }
}

// ---- 16.10 Small helpers of the blocks ----
// h[b, c, :] += v[b, c]: the timestep projection added to every pixel of a channel.
static void add_channel_bias(float* h, const float* v, int B, int C, int HW) {
    #pragma omp parallel for schedule(static) if ((size_t)B * C * HW > 65536)
    for (size_t bc = 0; bc < (size_t)B * C; bc++)
        for (int i = 0; i < HW; i++) h[bc * HW + i] += v[bc];
}

// dv[b, c] = sum over pixels of dh[b, c, :]   (the backward of add_channel_bias; it
// writes, not accumulates: its caller's projection gradient starts there)
static void sum_channel(float* dv, const float* dh, int B, int C, int HW) {
    FAST(sum_channel_fast(dv, dh, B, C, HW));
    for (int bc = 0; bc < B * C; bc++) {
        double s = 0;
        for (int i = 0; i < HW; i++) s += dh[(size_t)bc * HW + i];
        dv[bc] = (float)s;
    }
}

static void add_inplace(float* y, const float* x, size_t N) {
    #pragma omp parallel for schedule(static) if (N > 65536)
    for (size_t i = 0; i < N; i++) y[i] += x[i];
}

static void zero(float* x, size_t n) {
    size_t chunk = 65536;
    #pragma omp parallel for schedule(static) if (n > chunk)
    for (size_t i = 0; i < n; i += chunk) memset(x + i, 0, (n - i < chunk ? n - i : chunk) * sizeof(float));
}

// ============================================================================
// Part III. Fast kernels (an appendix: skip it on a first reading)
// ============================================================================
//
// Nothing here is in the paper: the layers of section 16, made fast, with the same results
// up to the rounding of another order of sums (tests/ checks every one against its
// reference). The convolutions run "direct" on zero-bordered grids (17.2), which section
// 14's GroupNorm+SiLU writes itself here (17.4-17.5). -DDDPM_PLAIN leaves this part out.
#ifndef DDPM_PLAIN

// ----------------------------------------------------------------------------
// 17. Fast kernels
//
// ---- 17.0 Vectors and register tiles, chosen per target ----
// The kernels below are written once, for vectors of VW
// floats (GCC/Clang vector extensions), and each keeps a tile of its result in
// registers while it sums. How big that tile can be depends on the machine: its
// accumulators, plus the vectors it loads and the value it broadcasts, must fit the
// register file, or the compiler spills them to the stack and the kernel runs many times
// slower. So the vector width and every tile's shape are chosen here, once, from the
// target the compiler builds for (BLIS does the same: one algorithm, a micro-kernel
// shape per architecture). Shapes are rows x vectors:
//   conv     CONV_MR output channels x CONV_NV vectors of pixels (17.2)
//   wide     CONV_MR_WIDE x CONV_NV_WIDE, for maps the main tile covers badly (17.2)
//   dweight  CONV_DW_K taps x CONV_DW_NV vectors of output channels (17.2)
//   gemm     GEMM_MR rows x GEMM_NV vectors of columns (17.1)
// A tile of R rows x V vectors costs R V accumulators + V loaded vectors + 1 broadcast
// (+ 1 product when there is no fused multiply-add).
// -DDDPM_NO_SIMD builds the same kernels as loops over arrays (a compiler without vector
// extensions gets that); tests/ runs every variant this machine can execute.
#if defined(DDPM_NO_SIMD) || !defined(__GNUC__)
#define DDPM_SIMD 0
#else
#define DDPM_SIMD 1
#endif
#if !DDPM_SIMD || defined(__AVX512F__)
// AVX-512: 32 registers of 16 floats. conv 8 x 3 = 24 accumulators + 3 loads + 1
// broadcast = 28; wide 4 x 5 = 20 + 5 + 1 (8 x 8 maps: 72 flat pixels fit 80, where
// 48-pixel tiles compute 96); dweight 9 taps x 2 = 18 + 2 + 1 (one 3x3 channel, 32
// output channels); gemm 8 x 2 = 16 + 2 + 1.
// The no-SIMD build takes the same shapes, in rows of 16 floats: it has no vector types
// and holds no tile in registers; the compiler vectorises its tile loops itself, with the
// accumulators in memory, and it does that best on long contiguous rows, where short
// SSE2-shaped rows leave it mostly loop overhead.
#define DDPM_ISA (DDPM_SIMD ? "avx512" : "no-simd")
#define VW 16
#define VEC_REGS 32
#define CONV_MR 8
#define CONV_NV 3
#define CONV_MR_WIDE 4
#define CONV_NV_WIDE 5
#define CONV_DW_K 9
#define CONV_DW_K1 8
#define CONV_DW_NV 2
#define GEMM_MR 8
#define GEMM_NV 2
#elif defined(__AVX__) && defined(__FMA__)
// AVX2 (or AVX) with FMA: 16 registers of 8 floats. conv 4 x 3 = 12 + 3 + 1 = 16 (24
// pixels: the 72 flat pixels of an 8 x 8 map are 3 tiles, so no wide tile is needed);
// dweight 6 taps x 2 = 12 + 2 + 1 (16 output channels; the 9 taps of a 3x3 channel
// take groups of 6 across channels); gemm 6 x 2 = 12 + 2 + 1, BLIS's Haswell shape.
#define DDPM_ISA "avx2"
#define VW 8
#define VEC_REGS 16
#define CONV_MR 4
#define CONV_NV 3
#define CONV_MR_WIDE 4
#define CONV_NV_WIDE 3
#define CONV_DW_K 6
#define CONV_DW_K1 6
#define CONV_DW_NV 2
#define GEMM_MR 6
#define GEMM_NV 2
#elif defined(__ARM_NEON) || defined(__aarch64__)
// ARM64 NEON: 32 registers of 4 floats. conv 8 x 3 = 24 + 3 + 1 (the weights are read
// from 8 rows, one broadcast at a time); wide 4 x 5 = 20 + 5 + 1; dweight 9 x 2 =
// 18 + 2 + 1 (8 output channels); gemm 8 x 3 = 24 + 3 + 2 (multiply-add by vector lane,
// the 8 values of A as two vectors), BLIS's Cortex-A57 shape.
#define DDPM_ISA "neon"
#define VW 4
#define VEC_REGS 32
#define CONV_MR 8
#define CONV_NV 3
#define CONV_MR_WIDE 4
#define CONV_NV_WIDE 5
#define CONV_DW_K 9
#define CONV_DW_K1 8
#define CONV_DW_NV 2
#define GEMM_MR 8
#define GEMM_NV 3
#else
// SSE2 (x86-64's baseline), AVX without FMA, and any other GCC target: 16 registers of
// 4 floats assumed, and a separate multiply and add (one more register for the
// product). conv 4 x 2 = 8 + 2 + 1 + 1; dweight 4 x 2 = 8 + 2 + 1 + 1; gemm 4 x 2 =
// 8 + 2 + 1 + 1.
#if defined(__SSE2__)
#define DDPM_ISA "sse2"
#else
#define DDPM_ISA "generic-vector"
#endif
#define VW 4
#define VEC_REGS 16
#define CONV_MR 4
#define CONV_NV 2
#define CONV_MR_WIDE 4
#define CONV_NV_WIDE 2
#define CONV_DW_K 4
#define CONV_DW_K1 4
#define CONV_DW_NV 2
#define GEMM_MR 4
#define GEMM_NV 2
#endif
#if DDPM_SIMD
typedef float vecf __attribute__((vector_size(4 * VW)));   // VW floats
// Loads and stores at any float address. (memcpy into an array of vectors does the
// same, but GCC then keeps the array on the stack, and every FMA of a tile waits on a
// store and a load.)
typedef float vecf_u __attribute__((vector_size(4 * VW), aligned(4), may_alias));
static inline vecf vload(const float* p) { return *(const vecf_u*)p; }
static inline void vstore(float* p, vecf v) { *(vecf_u*)p = v; }
#endif
#define CONV_NR (VW * CONV_NV)             // pixels per conv tile
#define CONV_NR_WIDE (VW * CONV_NV_WIDE)
#define CONV_NV_SMALL (CONV_NV - 1)        // the small tile: CONV_MR x one vector fewer, for 4 x 4 maps (17.2)
#define CONV_NR_SMALL (VW * CONV_NV_SMALL)
#define CONV_NV_MAX (CONV_NV > CONV_NV_WIDE ? CONV_NV : CONV_NV_WIDE)
#define CONV_NR_MAX (VW * CONV_NV_MAX)
#define CONV_DW_CO (VW * CONV_DW_NV)       // output channels per weight-gradient tile
#define GEMM_NR (VW * GEMM_NV)
_Static_assert(CONV_MR * CONV_NV + CONV_NV + 1 <= VEC_REGS && CONV_MR_WIDE * CONV_NV_WIDE + CONV_NV_WIDE + 1 <= VEC_REGS &&
               CONV_DW_K * CONV_DW_NV + CONV_DW_NV + 1 <= VEC_REGS && GEMM_MR * GEMM_NV + GEMM_NV + 1 <= VEC_REGS,
               "every tile's accumulators, loads and broadcast fit the register file");
static int round_up(int n, int m) { return (n + m - 1) / m * m; }

// Denormals. A float below 2^-126 (a denormal) costs some x86 cores a microcode assist of
// about a hundred cycles per instruction that meets it (an Intel AVX2 core sampled 1.45x
// faster without them). SiLU, softmax, GroupNorm, Adam and the 1e-10-scaled initial
// weights all make some, so the fast build flushes denormal results to zero (FTZ) and
// reads denormal inputs as zero (DAZ; ARM64's FZ does both), before main, so every OpenMP
// thread inherits it (tests/ checks each). A flushed value is below 1.2e-38, and the bits
// stay deterministic. The plain build (-DDDPM_PLAIN) keeps IEEE's gradual underflow.
#if defined(__GNUC__) && (defined(__SSE2__) || defined(__aarch64__))
__attribute__((constructor)) static void flush_denormals(void) {
#if defined(__SSE2__)
    __builtin_ia32_ldmxcsr(__builtin_ia32_stmxcsr() | 0x8040);   // FTZ (bit 15), DAZ (bit 6)
#else
    uint64_t fpcr;
    __asm__ volatile("mrs %0, fpcr" : "=r"(fpcr));
    __asm__ volatile("msr fpcr, %0" : : "r"(fpcr | (1ull << 24)));   // FZ
#endif
}
#define DDPM_FLUSH_DENORMALS 1
#else
#define DDPM_FLUSH_DENORMALS 0
#endif

// ---- 17.1 The matrix multiplication ----
// Linear layers, attention and the input gradient of the stride-2 convolution reduce to
//   C[M,N] (+)= op(A)[M,K] op(B)[K,N],  op(A)[i,p] = transA ? A[p*lda + i] : A[i*lda + p]
// (the convolutions themselves have their own direct kernel, 17.2). It is the classic
// blocked design of BLIS/GotoBLAS, in plain C: copy ("pack") a KC-deep slab of A into
// MR-row panels and of B into NR-column panels (B's rows are read where they lie when
// B is not transposed), so the innermost kernel streams both and keeps an MR x NR block
// of C in registers. OpenMP splits C into tiles, each owned by one thread and summed over
// K in one order, so the bits do not depend on the number of threads.
#define GEMM_MC 96
#define GEMM_KC 512
#define GEMM_NC (GEMM_NR * (1024 / GEMM_NR))
_Static_assert(GEMM_MC % GEMM_MR == 0 && GEMM_NC % GEMM_NR == 0, "packing buffers hold whole panels");

static float* gemm_pack_buffer;   // per thread: MC*KC floats of A, then KC*NC of B

static int thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

static int in_parallel(void) {
#ifdef _OPENMP
    return omp_in_parallel();
#else
    return 0;
#endif
}

// Called once at start-up (model build), so no step ever allocates. Per-thread buffers
// are sized for the thread count seen here; the parallel loops that use them ask for
// exactly that many threads (num_threads), so a later omp_set_num_threads is harmless.
static void gemm_init(void) {
    if (gemm_pack_buffer) return;
    kernel_threads = max_threads();
    gemm_pack_buffer = malloc_check((size_t)kernel_threads * (GEMM_MC * GEMM_KC + GEMM_KC * GEMM_NC) * sizeof(float), "matmul packing buffers");
}

// Copy op(A)[i0:i0+mc, p0:p0+kc] into panels of MR rows: Ap[panel][p][r], zero-padded.
// The loops run along memory (rows of A, or columns when transposed) so reads stream.
static void gemm_pack_a(float* Ap, const float* A, int lda, int transA, int i0, int mc, int p0, int kc) {
    for (int ir = 0; ir < mc; ir += GEMM_MR, Ap += (size_t)GEMM_MR * kc) {
        int m = mc - ir < GEMM_MR ? mc - ir : GEMM_MR;
        if (transA) {
            for (int p = 0; p < kc; p++) {
                const float* src = A + (size_t)(p0 + p) * lda + i0 + ir;
                for (int r = 0; r < m; r++) Ap[p * GEMM_MR + r] = src[r];
                for (int r = m; r < GEMM_MR; r++) Ap[p * GEMM_MR + r] = 0.0f;
            }
        } else {
            for (int r = 0; r < GEMM_MR; r++) {
                const float* src = A + (size_t)(i0 + ir + r) * lda + p0;
                for (int p = 0; p < kc; p++) Ap[p * GEMM_MR + r] = r < m ? src[p] : 0.0f;
            }
        }
    }
}

// Copy op(B)[p0:p0+kc, j0:j0+nc] into panels of NR columns: Bp[panel][p][c], zero-padded.
static void gemm_pack_b(float* Bp, const float* B, int ldb, int transB, int p0, int kc, int j0, int nc) {
    for (int jr = 0; jr < nc; jr += GEMM_NR, Bp += (size_t)GEMM_NR * kc) {
        int n = nc - jr < GEMM_NR ? nc - jr : GEMM_NR;
        if (!transB) {
            for (int p = 0; p < kc; p++) {
                const float* src = B + (size_t)(p0 + p) * ldb + j0 + jr;
                for (int c = 0; c < n; c++) Bp[p * GEMM_NR + c] = src[c];
                for (int c = n; c < GEMM_NR; c++) Bp[p * GEMM_NR + c] = 0.0f;
            }
        } else {
            for (int pb = 0; pb < kc; pb += 16)   // a transpose in 16-deep tiles
                for (int c = 0; c < GEMM_NR; c++) {
                    const float* src = B + (size_t)(j0 + jr + c) * ldb + p0;
                    int pe = pb + 16 < kc ? pb + 16 : kc;
                    for (int p = pb; p < pe; p++) Bp[p * GEMM_NR + c] = c < n ? src[p] : 0.0f;
                }
        }
    }
}

// The register-blocked inner kernel: an MR x NR block of C, kc terms deep, in MR x NV
// vectors (17.0): each step broadcasts one value of A's panel and does MR NV fused
// multiply-adds with a row of B's panel.
static void gemm_micro(int kc, const float* restrict a, const float* restrict b, int ldb,
                       float* restrict C, int ldc, int m, int n, int accumulate) {
#if DDPM_SIMD
    vecf acc[GEMM_MR][GEMM_NV];
    memset(acc, 0, sizeof acc);
    for (int p = 0; p < kc; p++, a += GEMM_MR, b += ldb) {
        vecf bv[GEMM_NV];
        for (int v = 0; v < GEMM_NV; v++) bv[v] = vload(b + VW * v);
        for (int r = 0; r < GEMM_MR; r++)
            for (int v = 0; v < GEMM_NV; v++) acc[r][v] += a[r] * bv[v];
    }
    if (m == GEMM_MR && n == GEMM_NR) {   // a full tile: whole vectors in and out
        for (int r = 0; r < GEMM_MR; r++)
            for (int v = 0; v < GEMM_NV; v++) {
                float* c = C + (size_t)r * ldc + VW * v;
                vstore(c, accumulate ? acc[r][v] + vload(c) : acc[r][v]);
            }
        return;
    }
    float out[GEMM_MR][GEMM_NR];
    memcpy(out, acc, sizeof out);
#else
    float out[GEMM_MR][GEMM_NR] = {{0}};
    for (int p = 0; p < kc; p++, a += GEMM_MR, b += ldb)
        for (int r = 0; r < GEMM_MR; r++)
            for (int c = 0; c < GEMM_NR; c++) out[r][c] += a[r] * b[c];
#endif
    for (int r = 0; r < m; r++)
        for (int c = 0; c < n; c++)
            C[(size_t)r * ldc + c] = accumulate ? C[(size_t)r * ldc + c] + out[r][c] : out[r][c];
}

static void matmul(float* C, const float* A, const float* B, int M, int N, int K,
                   int lda, int ldb, int ldc, int transA, int transB, int accumulate) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) {   // an empty sum
        if (!accumulate) for (int i = 0; i < M; i++) memset(C + (size_t)i * ldc, 0, N * sizeof(float));
        return;
    }
    gemm_init();
    // Called from inside a parallel loop (one image per thread), or when small, it runs
    // serially, with the calling thread's packing buffer. The id is read out here: inside
    // even an inactive `omp parallel` region the thread number restarts at 0.
    int serial = 2.0 * M * N * K <= 2e5 || in_parallel(), outer = thread_id();
    // In parallel, make at least 2 tiles per thread when the matrix allows, for load
    // balance. (Serially a split would only pack A once more.)
    int mt = (M + GEMM_MC - 1) / GEMM_MC, nc = GEMM_NC;
    while (!serial && nc > GEMM_NR && mt * ((N + nc - 1) / nc) < 2 * kernel_threads) nc = round_up(nc / 2, GEMM_NR);
    int nt = (N + nc - 1) / nc, parallel = !serial && mt * nt > 1;
    #pragma omp parallel for schedule(static) if (parallel) num_threads(kernel_threads)
    for (int tile = 0; tile < mt * nt; tile++) {
        int i0 = (tile / nt) * GEMM_MC, j0 = (tile % nt) * nc;
        int mc = M - i0 < GEMM_MC ? M - i0 : GEMM_MC, ncc = N - j0 < nc ? N - j0 : nc;
        int tid = parallel ? thread_id() : outer;
        float* Ap = gemm_pack_buffer + (size_t)tid * (GEMM_MC * GEMM_KC + GEMM_KC * GEMM_NC);
        float* Bp = Ap + GEMM_MC * GEMM_KC;
        for (int p0 = 0; p0 < K; p0 += GEMM_KC) {
            int kc = K - p0 < GEMM_KC ? K - p0 : GEMM_KC;
            // B is read where it lies when its rows hold whole NR-wide panels; only a
            // transposed B, or the last partial panel, is packed.
            int in_place = transB ? 0 : ncc / GEMM_NR * GEMM_NR;
            gemm_pack_a(Ap, A, lda, transA, i0, mc, p0, kc);
            if (in_place < ncc) gemm_pack_b(Bp, B, ldb, transB, p0, kc, j0 + in_place, ncc - in_place);
            for (int jr = 0; jr < ncc; jr += GEMM_NR)
                for (int ir = 0; ir < mc; ir += GEMM_MR)
                    gemm_micro(kc, Ap + (size_t)ir * kc,
                               jr < in_place ? B + (size_t)p0 * ldb + j0 + jr : Bp + (size_t)(jr - in_place) * kc,
                               jr < in_place ? ldb : GEMM_NR,
                               C + (size_t)(i0 + ir) * ldc + j0 + jr, ldc,
                               mc - ir < GEMM_MR ? mc - ir : GEMM_MR,
                               ncc - jr < GEMM_NR ? ncc - jr : GEMM_NR,
                               accumulate || p0 > 0);
        }
    }
}

// ---- 17.2 Convolution: conv2d_forward_fast / conv2d_backward_fast ----
// The convolution of 16.1 (K = 3 or 1, stride 1 or 2, "SAME" padding) runs "direct",
// with no im2col copy (a 3x3 stride-1 one where 17.2.1's rule takes Winograd's instead).
// Copy each input plane into a grid with a zero border, and number the grid's cells row
// by row with pitch Wp = W + 1: one zero column serves as the right border of a row and
// the left border of the next. Output pixel (h, w) gets the flat index p = h Wp + w, and
// the 9 inputs under its kernel sit at p + i Wp + j: one offset per tap, the same for
// every pixel.
// So out[o, p .. p+n-1] for n consecutive p is a sum of weight * (n consecutive
// floats of a padded plane): contiguous vector loads, no gather. The price is a junk
// column per row (p with w = W), computed and dropped.
//   1x1: no border is needed, so the input is used as it is (pitch W, no junk).
//   stride 2: split each input plane into its 4 phases x[2h + a, 2w + b], each a padded
//   (H/2) x (W/2) grid; tap (i, j) then reads phase (i mod 2, j mod 2) at a fixed offset,
//   and the stride-2 convolution becomes a stride-1 one over the phases.
// The register tile (17.0 gives its shape per target; 8 output channels x 48 flat pixels
// on AVX-512) sums over all C_in x K x K taps before it is stored once: each step loads
// CONV_NV vectors of the input and broadcasts CONV_MR weights into CONV_MR x CONV_NV
// fused multiply-adds. Three variants waste less where the main tile would: the wide
// tile on maps it covers with less overrun (on AVX-512, 4 channels x 80 pixels on an
// 8 x 8 map, whose 8 rows of pitch 9 fit one tile where 48-pixel tiles compute 96), the
// small tile of one vector fewer (on AVX-512, 32 pixels for the 20 of a 4 x 4 map), and
// CONV_MR_WIDE rows for a conv with at most that many outputs (conv_out: 3 channels).
//
// Backward, with dy on the output's grid:
//   dinp  is the same direct convolution of (padded) dy with the weights transposed
//         (o <-> c) and flipped (tap i, j -> 2 - i, 2 - j); for stride 2 it is
//         weight^T . dy scattered back onto the image (col2im), image by image;
//   dweight[o, c, i, j] = sum_{b, h, w} dy[b, o, h, w] xgrid[b, c, tap (i, j) + h Wp + w];
//         a reduction over pixels, so its tile is CONV_DW_CO output channels (vectors
//         of a transposed dy, [pixel][o]) x CONV_DW_K columns (c, tap) of the weight
//         matrix, each a broadcast input value.
// One thread sums each output element in a fixed order: the bits do not depend on the
// number of threads. Long float sums (here, in GroupNorm and in softmax) run in 16 partial sums,
// "lanes": a plain s += x[i] is one chain of dependent adds the compiler may not
// reorder, while the lanes are independent and become vector adds. The order is fixed,
// so the bits are too.
#define LANES 16

// sum of n floats in lanes, the lanes added in double. (With vectors the 16 lanes
// are 16 / VW vectors; the plain C loop computes the same bits.)
static double lane_sum(const float* x, int n) {
    float s[LANES] = {0};
    int i = 0;
#if DDPM_SIMD
    vecf v[LANES / VW] = {{0}};
    for (; i + LANES <= n; i += LANES)
        for (int k = 0; k < LANES / VW; k++) v[k] += vload(x + i + k * VW);
    memcpy(s, v, sizeof s);
#else
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; l++) s[l] += x[i + l];
#endif
    for (; i < n; i++) s[i % LANES] += x[i];
    double sum = 0;
    for (int l = 0; l < LANES; l++) sum += s[l];
    return sum;
}

// Columns (c, tap) of the weight matrix per weight-gradient tile, for T taps: all of a
// channel's taps when they fit the tile, else CONV_DW_K at a time across channels.
static int conv_dw_group(int T) { return T == 1 ? CONV_DW_K1 : T <= CONV_DW_K ? T : CONV_DW_K; }

typedef enum { CONV_PADDED, CONV_PLAIN, CONV_PHASES } ConvMode;

// The input grid of one channel and the offsets of the kernel's taps in it.
typedef struct {
    ConvMode mode;       // padded (3x3 stride 1), plain (1x1), phases (3x3 stride 2)
    int H, W, Wp;        // output size; row pitch of the input grid
    int L, Lr;           // flat output positions (H Wp, junk columns included), rounded up to nr
    int mr, nr;          // the register tile: output channels x flat pixels
    size_t P, S;         // one grid, with room for the last tile's overrun; one channel (1 or 4 grids)
    int T, toff[9];      // taps (K*K) and their offsets from the output's flat index
    // where output pixel (h, w) of channel o goes: o out_plane + out_off + h out_pitch + w out_step
    // (an image of H x W, but for one phase of the fused upsampling conv of 17.7)
    int out_pitch, out_step, out_off;
    size_t out_plane;
} ConvGeom;

// H, W: the input's size.
static ConvGeom conv_geom(int H, int W, int K, int stride) {
    ConvGeom g = {0};
    g.H = H / stride; g.W = W / stride; g.T = K * K;
    g.mode = stride == 2 ? CONV_PHASES : K == 3 || H * W < CONV_NR ? CONV_PADDED : CONV_PLAIN;
    g.Wp = g.mode == CONV_PLAIN ? g.W : g.W + 1;
    g.L = g.H * g.Wp;
    // the tile that wastes fewer pixels past the end (AVX-512 on 8 x 8: 72 = 8 rows of 9
    // fit in 80, 48 would compute 96; on 4 x 4, 20 = 4 rows of 5 fit in 32, 48 would
    // compute 48, three times the 16 pixels); a plain 1x1 needs the tile to fit in the
    // image. The wide tile has half the rows (each vector loaded serves 4 weights, not 8),
    // so it must save an eighth of the pixels (a 1x1 at 32 x 32 ran 1.2x faster in 1,056
    // than in 1,040); the small tile loads fewer vectors per broadcast weight: a quarter.
    int full = round_up(g.L, CONV_NR), fits = g.mode != CONV_PLAIN;   // pixels the main tile computes
    int wide = 8 * round_up(g.L, CONV_NR_WIDE) < 7 * full && (fits || g.L >= CONV_NR_WIDE);
    int small = !wide && 4 * round_up(g.L, CONV_NR_SMALL) <= 3 * full && (fits || g.L >= CONV_NR_SMALL);
    g.mr = wide ? CONV_MR_WIDE : CONV_MR;
    g.nr = wide ? CONV_NR_WIDE : small ? CONV_NR_SMALL : CONV_NR;
    g.Lr = round_up(g.L, g.nr);
    g.P = g.mode == CONV_PLAIN ? (size_t)g.L : (size_t)round_up(g.Lr + 2 * g.Wp + 2, 16);
    g.S = g.mode == CONV_PHASES ? 4 * g.P : g.P;
    g.out_pitch = g.W; g.out_step = 1; g.out_off = 0; g.out_plane = (size_t)g.H * g.W;
    for (int i = 0; i < K; i++)
        for (int j = 0; j < K; j++) {
            int* t = &g.toff[i * K + j];
            if (g.mode == CONV_PHASES) *t = (int)(((i % 2) * 2 + j % 2) * g.P) + (i / 2 + 1) * g.Wp + j / 2 + 1;
            else if (g.mode == CONV_PLAIN) *t = 0;
            else *t = K == 1 ? g.Wp + 1 : i * g.Wp + j;   // a tiny 1x1 (H W < CONV_NR) reads the grid's centre
        }
    return g;
}

// Scratch of one conv call (the caller owns it, sized by conv2d_workspace_floats):
//   planes   B x max(C_in, C_out) input grids: the input, later the output gradient
//   dyt      B x HW_out x C_out (rounded up to 32): the output gradient transposed, for dweight
//   flipped  the weights as the input gradient's matrix (conv_flip_weights)
//   dwacc    the weight-gradient tiles being summed
//   dcol     stride 2 only: weight^T . dy of one image per thread, for col2im
// Winograd's scratch (17.2.1) is the planes': the two are never in use at once.
typedef struct { float *planes, *dyt, *flipped, *dwacc, *dcol; } ConvWork;

static int wino_tile(int B, int C_in, int C_out, int H, int W);
static size_t wino_floats_for(int B, int C_in, int C_out, int H, int W, int threads);

static ConvWork conv_work(float* ws, int B, int C_in, int H, int W, int C_out, int K, int stride,
                          int threads, size_t* total) {
    ConvGeom g = conv_geom(H, W, K, stride);
    int C_max = C_in > C_out ? C_in : C_out, CoP = round_up(C_out, CONV_DW_CO);
    size_t wino = K == 3 && stride == 1 ? wino_floats_for(B, C_in, C_out, H, W, threads) : 0;
    size_t n[5] = {g.mode == CONV_PLAIN ? 0 : (size_t)B * C_max * g.S,
                   (size_t)B * g.H * g.W * CoP,
                   (size_t)C_in * C_out * g.T,
                   (size_t)CoP * CONV_DW_K * ((C_in * g.T + conv_dw_group(g.T) - 1) / conv_dw_group(g.T)),
                   stride == 2 ? (size_t)threads * C_in * g.T * g.H * g.W : 0};
    if (n[0] < wino) n[0] = wino;
    float* p[5];
    *total = 0;
    for (int i = 0; i < 5; i++) { p[i] = ws ? ws + *total : NULL; *total += n[i]; }
    return (ConvWork){p[0], p[1], p[2], p[3], p[4]};
}

// The floats of scratch a conv2d_forward + conv2d_backward of this shape needs.
static size_t conv2d_workspace_floats_fast(int B, int C_in, int H, int W, int C_out, int K, int stride, int threads) {
    size_t total;
    conv_work(NULL, B, C_in, H, W, C_out, K, stride, threads, &total);
    return total;
}

// The cells of one grid outside its H x W image: border and slack, all zero.
static void conv_zero_border(float* xp, ConvGeom g) {
    memset(xp, 0, (g.Wp + 1) * sizeof(float));          // top border, and row 0's left border
    for (int h = 0; h < g.H; h++) xp[(size_t)(h + 1) * g.Wp + 1 + g.W] = 0.0f;   // right = next row's left
    size_t tail = (size_t)(g.H + 1) * g.Wp + 1;
    memset(xp + tail, 0, (g.P - tail) * sizeof(float));   // bottom border and slack
}

// C channels of one image (each H_in x W_in) into their grids: one padded grid each,
// or 4 phase grids each for stride 2, filled row by row: input row y goes to the
// phases (y mod 2, 0) (its even pixels) and (y mod 2, 1) (its odd pixels).
static void conv_pad_image(float* xp, const float* x, int C, ConvGeom g) {
    int phases = g.mode == CONV_PHASES, W_in = phases ? 2 * g.W : g.W, H_in = phases ? 2 * g.H : g.H;
    for (int c = 0; c < C; c++, xp += g.S, x += (size_t)H_in * W_in) {
        for (int ph = 0; ph < (phases ? 4 : 1); ph++) conv_zero_border(xp + ph * g.P, g);
        for (int y = 0; y < H_in; y++) {
            const float* src = x + (size_t)y * W_in;
            if (!phases) { memcpy(xp + (size_t)(y + 1) * g.Wp + 1, src, g.W * sizeof(float)); continue; }
            float* even = xp + (size_t)(y % 2) * 2 * g.P + (size_t)(y / 2 + 1) * g.Wp + 1;
            float* odd = even + g.P;
            for (int w = 0; w < g.W; w++) { even[w] = src[2 * w]; odd[w] = src[2 * w + 1]; }
        }
    }
}

// The batch's input grids (a plain 1x1 needs none: it reads the input where it is).
static const float* conv_grids(float* planes, const float* x, int B, int C, ConvGeom g) {
    if (g.mode == CONV_PLAIN) return x;
    int phases = g.mode == CONV_PHASES;
    size_t in_image = (size_t)C * g.H * g.W * (phases ? 4 : 1);
    #pragma omp parallel for schedule(static) num_threads(kernel_threads)
    for (int b = 0; b < B; b++) conv_pad_image(planes + (size_t)b * C * g.S, x + (size_t)b * in_image, C, g);
    return planes;
}

// The matrix of the input gradient (backward): rows are input channels, columns (output
// channel, flipped tap), wt[i][o T + t] = weight[o][i][T - 1 - t]. The forward reads the
// weights where they lie: their rows (output channels) already run over (c, tap).
static void conv_flip_weights(float* wt, const float* weight, int C_out, int C_in, int T) {
    #pragma omp parallel for schedule(static) num_threads(kernel_threads)
    for (int i = 0; i < C_in; i++)
        for (int o = 0; o < C_out; o++)
            for (int t = 0; t < T; t++)
                wt[((size_t)i * C_out + o) * T + t] = weight[((size_t)o * C_in + i) * T + (T - 1 - t)];
}

// The register tile: tile[r][j] = sum_{c, t} a[r lda + (c T + t) ka] x[c S + toff[t] + j] for
// r < MR rows and j < VW NV pixels, stored row by row. `a` is the tile's first row of
// the weight matrix (rows of lda = C T floats, ka = 1; only the first `rows` are read, the
// others repeat the last one and are dropped by the store), x the first input grid (at the
// tile's first pixel). Called with MR and NV constants, so that acc lives in registers.
// (Unrolling the taps as well runs AVX-512's 4 x 80 tile out of registers.)
static inline void conv_tile(float* restrict tile, const float* restrict a, size_t lda, int ka, int rows,
                             const float* restrict x, int C, size_t S, int T, const int* toff, int MR, int NV) {
    // Row r's offset in a, set once per tile (the row loops are unrolled at -O2 too, so
    // each is a register, not a test and a product for every weight read).
    size_t ro[CONV_MR];
    #pragma GCC unroll 8
    for (int r = 0; r < MR; r++) ro[r] = (size_t)(r < rows ? r : rows - 1) * lda;
#if DDPM_SIMD
    vecf acc[CONV_MR][CONV_NV_MAX];
    for (int r = 0; r < MR; r++)
        for (int j = 0; j < NV; j++) acc[r][j] = (vecf){0};
    for (int c = 0, k = 0; c < C; c++, x += S)
        for (int t = 0; t < T; t++, k += ka) {
            const float* xt = x + toff[t];
            vecf v[CONV_NV_MAX];
            for (int j = 0; j < NV; j++) v[j] = vload(xt + VW * j);
            #pragma GCC unroll 8
            for (int r = 0; r < MR; r++)
                for (int j = 0; j < NV; j++) acc[r][j] += a[ro[r] + k] * v[j];
        }
    for (int r = 0; r < MR; r++)
        for (int j = 0; j < NV; j++) vstore(tile + (r * NV + j) * VW, acc[r][j]);
#else
    memset(tile, 0, sizeof(float) * MR * NV * VW);
    for (int c = 0, k = 0; c < C; c++, x += S)
        for (int t = 0; t < T; t++, k += ka)
            for (int r = 0; r < MR; r++)
                for (int j = 0; j < VW * NV; j++) tile[r * NV * VW + j] += a[ro[r] + k] * x[toff[t] + j];
#endif
}

// Write (bias == NULL: add) `rows` rows of the tile at flat index p0 into channels
// o0.. of an image out (C x H x W), from column `skip` on, dropping the junk columns.
static void conv_store_tile(float* out, const float* tile, int o0, int rows, int p0, int skip,
                            ConvGeom g, const float* bias) {
    for (int j = skip; j < g.nr;) {
        int p = p0 + j, h = p / g.Wp, w = p % g.Wp;
        if (h >= g.H) break;
        if (w >= g.W) { j += g.Wp - w; continue; }
        int n = g.W - w < g.nr - j ? g.W - w : g.nr - j, s = g.out_step;
        for (int r = 0; r < rows; r++) {
            float* dst = out + (o0 + r) * g.out_plane + g.out_off + (size_t)h * g.out_pitch + (size_t)w * s;
            const float* src = tile + r * g.nr + j;
            if (s == 1 && bias) for (int k = 0; k < n; k++) dst[k] = bias[o0 + r] + src[k];
            else if (s == 1)    for (int k = 0; k < n; k++) dst[k] += src[k];
            else if (bias)      for (int k = 0; k < n; k++) dst[k * s] = bias[o0 + r] + src[k];
            else                for (int k = 0; k < n; k++) dst[k * s] += src[k];
        }
        j += n;
    }
}

// out (B, C_out, H, W) = (or +=, if bias is NULL) the direct convolution of the input
// grids (B x C_in) with the weights w (C_out, C_in, T), read where they lie. Work items
// are (image, tile of pixels), over all output channels, or over a part where items are
// too few for the threads. A plain 1x1's last tile ends at the image's last pixel (it
// has no slack). n_ph > 1: the four phases of 17.7's upsampling conv, g[0..3], weights
// one phase after another; an item does all four, while their cache lines are at hand.
static void conv_direct(float* out, const float* planes, const float* w, const float* bias,
                        int B, int C_in, int C_out, const ConvGeom* g, int n_ph) {
    // A 3-channel output (conv_out) would waste 5 of 8 rows: CONV_MR_WIDE-row tiles then.
    int narrow = g->nr == CONV_NR && C_out <= CONV_MR_WIDE, mr = narrow ? CONV_MR_WIDE : g->mr;
    int n_p = g->Lr / g->nr, n_m = (C_out + mr - 1) / mr, T = g->T;
    size_t lda = (size_t)C_in * T, phase = (size_t)C_out * lda;
    int parts = 1;   // the output channels in `parts` parts: at least 4 work items a thread
    while (parts < n_m && B * n_p * parts < 4 * kernel_threads) parts *= 2;
    int per = (n_m + parts - 1) / parts;
    parts = (n_m + per - 1) / per;
    #pragma omp parallel for schedule(static) num_threads(kernel_threads)
    for (int item = 0; item < B * n_p * parts; item++) {
        int b = item / parts / n_p, p0 = (item / parts % n_p) * g->nr, skip = 0;
        int m0 = item % parts * per, m1 = m0 + per < n_m ? m0 + per : n_m;
        if (g->mode == CONV_PLAIN && p0 + g->nr > g->L) { skip = p0 + g->nr - g->L; p0 = g->L - g->nr; }
        const float* x = planes + (size_t)b * C_in * g->S + p0;
        float* y = out + (size_t)b * C_out * g->out_plane;
        float tile[CONV_MR * CONV_NR_MAX];
        for (int m = m0; m < m1; m++)
            for (int ph = 0; ph < n_ph; ph++) {
                int o0 = m * mr, rows = C_out - o0 < mr ? C_out - o0 : mr;
                const float* a = w + ph * phase + o0 * lda;
                const int* toff = g[ph].toff;
                if (narrow)                conv_tile(tile, a, lda, 1, rows, x, C_in, g->S, T, toff, CONV_MR_WIDE, CONV_NV);
                else if (g->nr == CONV_NR && T == 1)   // a 1x1: its tap loop gone (~5% on AVX-512)
                                           conv_tile(tile, a, lda, 1, rows, x, C_in, g->S, 1, toff, CONV_MR, CONV_NV);
                else if (g->nr == CONV_NR) conv_tile(tile, a, lda, 1, rows, x, C_in, g->S, T, toff, CONV_MR, CONV_NV);
                else if (g->nr == CONV_NR_SMALL) conv_tile(tile, a, lda, 1, rows, x, C_in, g->S, T, toff, CONV_MR, CONV_NV_SMALL);
                else                       conv_tile(tile, a, lda, 1, rows, x, C_in, g->S, T, toff, CONV_MR_WIDE, CONV_NV_WIDE);
                conv_store_tile(y, tile, o0, rows, p0, skip, g[ph], bias);
            }
    }
}

// The output gradient of the batch, dy[b, o, pixel (h, w) of g's output map], into
// dyt[b][h W + w][o] (C_out rounded up to CoP, the extra channels zero), a tile's channels at a time.
static void conv_transpose_dy(float* dyt, const float* dy, int B, int C_out, int CoP, ConvGeom g) {
    int HW = g.H * g.W;
    #pragma omp parallel for schedule(static) num_threads(kernel_threads)
    for (int b = 0; b < B; b++) {
        const float* d = dy + (size_t)b * C_out * g.out_plane + g.out_off;
        float* t = dyt + (size_t)b * HW * CoP;
        for (int o0 = 0; o0 < CoP; o0 += CONV_DW_CO)
            for (int h = 0; h < g.H; h++)
                for (int w = 0; w < g.W; w++)
                    for (int o = o0; o < o0 + CONV_DW_CO; o++)
                        t[(size_t)(h * g.W + w) * CoP + o] =
                            o < C_out ? d[o * g.out_plane + (size_t)h * g.out_pitch + (size_t)w * g.out_step] : 0.0f;
    }
}

// dbias += the sum of dy over images and pixels.
static void conv_dbias(float* dbias, const float* dout, int B, int C_out, size_t HWo) {
    #pragma omp parallel for schedule(static) num_threads(kernel_threads)
    for (int co = 0; co < C_out; co++) {
        double sum = 0;
        for (int b = 0; b < B; b++) sum += lane_sum(dout + ((size_t)b * C_out + co) * HWo, (int)HWo);
        dbias[co] += (float)sum;
    }
}

// The weight-gradient tile: acc[t][o] += sum_{h0 <= h < h1, w} x[off[t] + h Wp + w] dyt[h W + w][o]
// for CONV_DW_CO channels o and n <= CONV_DW_K columns t, over nb images (x and dyt
// advance by xs and ds floats from one to the next), kept in memory between calls.
// Called with n a constant where it can be, so the compiler unrolls the taps.
static inline void conv_dw_tile(float* restrict accmem, const float* restrict dyt, int CoP,
                                const float* restrict x, const int* off, int n, ConvGeom g, int h0, int h1,
                                int nb, size_t xs, size_t ds) {
#if DDPM_SIMD
    vecf acc[CONV_DW_K][CONV_DW_NV];
    for (int t = 0; t < n; t++)
        for (int v = 0; v < CONV_DW_NV; v++) acc[t][v] = vload(accmem + (t * CONV_DW_NV + v) * VW);
    for (int b = 0; b < nb; b++, x += xs, dyt += ds)
        for (int h = h0; h < h1; h++) {
            const float* xr = x + (size_t)h * g.Wp;
            const float* d = dyt + (size_t)h * g.W * CoP;
            for (int w = 0; w < g.W; w++, d += CoP) {
                vecf dv[CONV_DW_NV];
                for (int v = 0; v < CONV_DW_NV; v++) dv[v] = vload(d + VW * v);
                for (int t = 0; t < n; t++) {
                    float xv = xr[w + off[t]];
                    for (int v = 0; v < CONV_DW_NV; v++) acc[t][v] += xv * dv[v];
                }
            }
        }
    for (int t = 0; t < n; t++)
        for (int v = 0; v < CONV_DW_NV; v++) vstore(accmem + (t * CONV_DW_NV + v) * VW, acc[t][v]);
#else
    for (int b = 0; b < nb; b++, x += xs, dyt += ds)
        for (int h = h0; h < h1; h++)
            for (int w = 0; w < g.W; w++)
                for (int t = 0; t < n; t++)
                    for (int o = 0; o < CONV_DW_CO; o++)
                        accmem[t * CONV_DW_CO + o] += x[off[t] + h * g.Wp + w] * dyt[((size_t)h * g.W + w) * CoP + o];
#endif
}

// dweight += dy . xgrid (see above). Tiles are (CONV_DW_CO output channels, a group of
// columns (c, tap) of the weight matrix, conv_dw_group: on AVX-512 one channel's 9 taps
// (3x3), 4 taps (17.7's 2x2), or 8 channels of a 1x1, so that channel counts divide
// evenly). Each thread owns a fixed range of tiles and walks the images in order. A
// large image is walked in bands of rows, so that a band's transposed dy (CONV_DW_BAND
// floats, 128 KiB) stays in L2 while the thread's tiles take their turn (at 256 x 256 x 128
// one image's is 32 MiB: on Zen 5 the backward went from 37% to 75% of the FMA peak);
// below CONV_DW_SWEEP floats an image is swept whole. Small images are taken several at
// a time instead, as many as fill a band, each tile keeping its sums in registers across
// them. Each tile adds its pixels in the same order in every case: the same bits.
#ifndef CONV_DW_BAND
#define CONV_DW_BAND 32768
#endif
#define CONV_DW_SWEEP (1 << 20)
static void conv_dweight(float* dweight, float* dwacc, const float* planes, const float* dyt,
                         int B, int C_in, int C_out, ConvGeom g) {
    int CoP = round_up(C_out, CONV_DW_CO), Kc = C_in * g.T, G = conv_dw_group(g.T);
    int n_groups = (Kc + G - 1) / G, n_tiles = (CoP / CONV_DW_CO) * n_groups;
    size_t image = (size_t)g.H * g.W * CoP;   // dy of one image
    int band = image <= CONV_DW_SWEEP ? g.H : CONV_DW_BAND / (g.W * CoP) > 0 ? CONV_DW_BAND / (g.W * CoP) : 1;
    int nb = band == g.H && image < CONV_DW_BAND ? (int)(CONV_DW_BAND / image) : 1;   // images at a time
    memset(dwacc, 0, (size_t)n_tiles * CONV_DW_K * CONV_DW_CO * sizeof(float));
    #pragma omp parallel num_threads(kernel_threads)
    {
#ifdef _OPENMP
        int nth = omp_get_num_threads();
#else
        int nth = 1;
#endif
        int id = thread_id(), lo = n_tiles * id / nth, hi = n_tiles * (id + 1) / nth;
        size_t xs = (size_t)C_in * g.S;
        for (int b = 0; b < B; b += nb)
            for (int h0 = 0; h0 < g.H; h0 += band)
                for (int tile = lo; tile < hi; tile++) {
                    int o0 = (tile / n_groups) * CONV_DW_CO, k0 = (tile % n_groups) * G, h1 = h0 + band;
                    int n = Kc - k0 < G ? Kc - k0 : G, off[CONV_DW_K], m = B - b < nb ? B - b : nb;
                    if (h1 > g.H) h1 = g.H;
                    for (int t = 0; t < n; t++) off[t] = (int)(((k0 + t) / g.T) * g.S) + g.toff[(k0 + t) % g.T];
                    const float* x = planes + b * xs;
                    const float* d = dyt + b * image + o0;
                    float* acc = dwacc + (size_t)tile * CONV_DW_K * CONV_DW_CO;
                    if (n == CONV_DW_K)       conv_dw_tile(acc, d, CoP, x, off, CONV_DW_K, g, h0, h1, m, xs, image);
                    else if (n == CONV_DW_K1) conv_dw_tile(acc, d, CoP, x, off, CONV_DW_K1, g, h0, h1, m, xs, image);
                    else if (n == 4)          conv_dw_tile(acc, d, CoP, x, off, 4, g, h0, h1, m, xs, image);
                    else                      conv_dw_tile(acc, d, CoP, x, off, n, g, h0, h1, m, xs, image);
                }
    }
    #pragma omp parallel for schedule(static) num_threads(kernel_threads)
    for (int o = 0; o < C_out; o++)
        for (int k = 0; k < Kc; k++) {
            int tile = (o / CONV_DW_CO) * n_groups + k / G;
            dweight[(size_t)o * Kc + k] += dwacc[((size_t)tile * CONV_DW_K + k % G) * CONV_DW_CO + o % CONV_DW_CO];
        }
}

// The input gradient of the stride-2 conv: per image, dcol = weight^T . dy (the matmul
// of 17.1), then col2im scatters each column back onto the input pixels it came from.
static void col2im(float* img, const float* col, int C, int H, int W, int K, int stride) {
    int Ho = H / stride, Wo = W / stride, pad = conv_pad(K, stride);
    for (int c = 0; c < C; c++)
        for (int k = 0; k < K * K; k++) {
            int ki = k / K, kj = k % K;
            const float* src = col + ((size_t)c * K * K + k) * Ho * Wo;
            for (int oy = 0; oy < Ho; oy++) {
                int y = oy * stride + ki - pad;
                if (y < 0 || y >= H) continue;
                for (int ox = 0; ox < Wo; ox++) {
                    int x = ox * stride + kj - pad;
                    if (x >= 0 && x < W) img[((size_t)c * H + y) * W + x] += src[oy * Wo + ox];
                }
            }
        }
}

static void conv_strided_dinp(float* dinp, float* dcol, const float* dout, const float* weight,
                              int B, int C_in, int H, int W, int C_out, int K, int stride) {
    int HWo = (H / stride) * (W / stride), CKK = C_in * K * K;
    #pragma omp parallel for schedule(static) if (B > 1) num_threads(kernel_threads)
    for (int b = 0; b < B; b++) {
        float* mine = dcol + (size_t)(B > 1 ? thread_id() : 0) * CKK * HWo;
        matmul(mine, weight, dout + (size_t)b * C_out * HWo, CKK, HWo, C_out, CKK, HWo, HWo, 1, 0, 0);
        col2im(dinp + (size_t)b * C_in * H * W, mine, C_in, H, W, K, stride);
    }
}

// ---- 17.2.1 Winograd's minimal filtering for the 3x3 stride-1 conv ----
// Lavin & Gray (2015): m x m outputs of a 3x3 conv from an (m+2) x (m+2) input tile d take
//   Y = A^T [ (G g G^T) . (B^T d B) ] A         (. elementwise; a = m + 2)
// where G g G^T transforms the 3x3 filter g and B^T d B the tile to a x a values each, so
// a tile costs a^2 multiplies per (input, output) channel pair where the direct conv costs
// 9 m^2: 2.25x fewer for F(2x2, 3x3), 4x fewer for F(4x4, 3x3) (on their points 0, +-1,
// +-2 and infinity). Summed over the input channels, the elementwise products are a^2
// independent matrix products, one per position xi of the a x a grid, for a chunk of tiles:
//   M_xi[tile][o] = sum_c V_xi[tile][c] U_xi[c][o]     (V = B^T d B, U = G g G^T)
// which 17.2's register tile does, with one tap. The transforms act on VW channels at a
// time: the input is first copied channel-innermost (xt), so a tile's a^2 values of VW
// channels are vector loads; only the writing of Y into the output planes is scalar.
// The price is accuracy: the transforms' coefficients (up to 8, and 1/6, 1/24) round, and
// F(4x4)'s errors are about 10 times the direct conv's, F(2x2)'s about twice (tests/
// measures them on every variant; the README says what that does to bits/dim and samples).
// Each tile's sums are its own, in one order, so the bits do not depend on the threads.
// The input gradient is this conv of dY with the flipped weights; the weight gradient, its adjoint.
#define WINO_NT 128                   // tiles a chunk at most, and fewer where a thread's
#define WINO_CHUNK_FLOATS (1 << 20)   // V and M would pass 4 MB
#define WINO_MIN_CH 32
#define WINO_MIN_TILES 32
static const float WINO2_G[4][3] = {{1, 0, 0}, {0.5, 0.5, 0.5}, {0.5, -0.5, 0.5}, {0, 0, 1}};
static const float WINO4_G[6][3] = {{0.25, 0, 0}, {-1 / 6.0f, -1 / 6.0f, -1 / 6.0f}, {-1 / 6.0f, 1 / 6.0f, -1 / 6.0f},
                                     {1 / 24.0f, 1 / 12.0f, 1 / 6.0f}, {1 / 24.0f, -1 / 12.0f, 1 / 6.0f}, {0, 0, 1}};

// The rule: which tile a 3x3 stride-1 conv of this shape takes, 0 for the direct conv,
// from measurements on AVX-512 and AVX2 (tests/README.md; bench_ddpm --winograd-table).
// Below 32 channels the transforms cost more than the products they save. The filters'
// transform U (a^2 C_in C_out floats) is made and read again for every call whatever
// the batch, each value of it serving one product per tile: F(4x4) needs at least 32
// tiles, and C/2 for C channels (C = 256: U is 9 MB, past the cache), else F(2x2), with 4
// times the tiles, does; else direct.
// wino_force (tests/, the benchmark) overrides it: -1 the direct conv, 2 or 4 that tile, everywhere.
static int wino_force;
static int wino_tile(int B, int C_in, int C_out, int H, int W) {
    if (wino_force) return wino_force < 0 ? 0 : wino_force;
    if (C_in < WINO_MIN_CH || C_out < WINO_MIN_CH) return 0;
    for (int m = 4; m >= 2; m -= 2) {
        size_t tiles = (size_t)B * ((H + m - 1) / m) * ((W + m - 1) / m);
        if (tiles >= WINO_MIN_TILES && 2 * tiles >= (size_t)(C_in > C_out ? C_in : C_out)) return m;
    }
    return 0;
}

typedef struct {
    int m, a, Ht, Wt, ty, tx;   // tile side, a = m + 2; the copied input's rows and pitch; tiles down and across
    int CiP, nv, CoM;           // input channels rounded up to VW; output channels in blocks of nv vectors
    size_t n_tiles;             // B ty tx
    int nt;                     // tiles a chunk at most
    size_t vs, ms;              // floats from one xi's V (M) to the next: not a power of 2, lest the a^2 share a cache set
} WinoGeom;

static WinoGeom wino_geom(int m, int B, int C_in, int C_out, int H, int W) {
    // the register tile of one vector fewer where its blocks waste fewer output channels
    int nv = round_up(C_out, CONV_NR_SMALL) < round_up(C_out, CONV_NR) ? CONV_NV_SMALL : CONV_NV;
    WinoGeom w = {m, m + 2, 0, 0, (H + m - 1) / m, (W + m - 1) / m, round_up(C_in, VW), nv, round_up(C_out, nv * VW), 0, 0, 0, 0};
    w.Ht = w.ty * m + 2, w.Wt = w.tx * m + 2;
    w.n_tiles = (size_t)B * w.ty * w.tx;
    size_t fit = WINO_CHUNK_FLOATS / ((size_t)w.a * w.a * (w.CiP + w.CoM)) / CONV_MR * CONV_MR;
    w.nt = fit < CONV_MR ? CONV_MR : fit < WINO_NT ? (int)fit : WINO_NT;
    w.vs = (size_t)w.nt * w.CiP + 16, w.ms = (size_t)w.nt * w.CoM + 16;
    return w;
}

// Scratch: xt (B, CiP/VW, Ht Wt, VW), U (a^2, CiP, CoM), then per thread V (a^2, nt, CiP)
// and M (a^2, CoM / (nv VW), nt, nv VW).
static size_t wino_floats(WinoGeom w, int B, int threads) {
    size_t a2 = (size_t)w.a * w.a;
    return (size_t)B * w.CiP * w.Ht * w.Wt + a2 * w.CiP * w.CoM + (size_t)threads * a2 * (w.vs + w.ms);
}

// The weight gradient's (below): xt and dy copied, dU, one chunk's V and dM.
static size_t wino_dweight_floats(WinoGeom w, int B) {
    size_t a2 = (size_t)w.a * w.a;
    return (size_t)B * (w.CiP + w.CoM) * w.Ht * w.Wt + a2 * (w.CiP * w.CoM + w.vs + w.ms);
}

// The scratch of a conv's Winograd forward, input and weight gradients, 0 where the rule takes neither.
static size_t wino_floats_for(int B, int C_in, int C_out, int H, int W, int threads) {
    int mf = wino_tile(B, C_in, C_out, H, W), mb = wino_tile(B, C_out, C_in, H, W);   // forward, input gradient
    size_t f = mf ? wino_floats(wino_geom(mf, B, C_in, C_out, H, W), B, threads) : 0;
    size_t b = mb ? wino_floats(wino_geom(mb, B, C_out, C_in, H, W), B, threads) : 0;
    size_t d = mf ? wino_dweight_floats(wino_geom(mf, B, C_in, C_out, H, W), B) : 0;   // the weight gradient's
    return f > b ? (f > d ? f : d) : (b > d ? b : d);
}

// U_xi[c][o] = (G g G^T)[xi] for g = weight[o][c] (C_out, C_in, 3, 3); zero past C_in, C_out.
static void wino_filters(float* U, const float* weight, int C_in, int C_out, WinoGeom w) {
    const float* G = w.m == 4 ? &WINO4_G[0][0] : &WINO2_G[0][0];
    int a = w.a;
    #pragma omp parallel for schedule(static) num_threads(kernel_threads)
    for (int c = 0; c < w.CiP; c++)
        for (int o0 = 0; o0 < w.CoM; o0 += 64) {   // 64 output channels at a time, in vectors
            float g[9][64] = {{0}}, Gg[6][3][64];
            for (int o = o0; o < o0 + 64 && o < C_out && c < C_in; o++)
                for (int k = 0; k < 9; k++) g[k][o - o0] = weight[((size_t)o * C_in + c) * 9 + k];
            for (int i = 0; i < a; i++)                                                  // G g
                for (int j = 0; j < 3; j++)
                    for (int o = 0; o < 64; o++)
                        Gg[i][j][o] = G[i * 3] * g[j][o] + G[i * 3 + 1] * g[3 + j][o] + G[i * 3 + 2] * g[6 + j][o];
            int n = w.CoM - o0 < 64 ? w.CoM - o0 : 64;
            for (int i = 0; i < a; i++)                                                  // (G g) G^T
                for (int j = 0; j < a; j++) {
                    float* u = U + ((size_t)(i * a + j) * w.CiP + c) * w.CoM + o0;
                    for (int o = 0; o < n; o++) u[o] = Gg[i][0][o] * G[j * 3] + Gg[i][1][o] * G[j * 3 + 1] + Gg[i][2][o] * G[j * 3 + 2];
                }
        }
}

// The input (B, C, H, W), read at x[c plane + y pitch + x], into xt: channels innermost in
// VW blocks, a zero border of one pixel on the top and left and enough on the bottom and
// right for whole tiles.
static void wino_input(float* xt, const float* x, size_t plane, int pitch, int B, int C, int H, int W, WinoGeom w) {
    size_t img = (size_t)w.Ht * w.Wt * VW;
    #pragma omp parallel for schedule(static) num_threads(kernel_threads)
    for (int bc = 0; bc < B * (w.CiP / VW); bc++) {
        int b = bc / (w.CiP / VW), c0 = bc % (w.CiP / VW) * VW;
        float* dst = xt + (size_t)bc * img;
        memset(dst, 0, img * sizeof(float));
        for (int y = 0; y < H; y++)   // a row of the VW planes at a time: its writes stay in L1
            for (int l = 0; l < VW && c0 + l < C; l++) {
                const float* src = x + ((size_t)b * C + c0 + l) * plane + (size_t)y * pitch;
                for (int xx = 0; xx < W; xx++) dst[((size_t)(y + 1) * w.Wt + xx + 1) * VW + l] = src[xx];
            }
    }
}

// The 1-D transforms, each on VW lanes at once: in[k] at in + k is, out[i] at out + i os
// (floats). B^T (a values to a) for the input, A^T (a to m) for the output; written out,
// as NNPACK does, so that no zero coefficient costs an operation.
#if DDPM_SIMD
typedef vecf wlanes;   // WL lanes at a time: all VW in one vector, or (no SIMD) one float
#define WL VW
static inline wlanes wl_load(const float* p) { return vload(p); }
static inline void wl_store(float* p, wlanes v) { vstore(p, v); }
#else
typedef float wlanes;
#define WL 1
static inline wlanes wl_load(const float* p) { return *p; }
static inline void wl_store(float* p, wlanes v) { *p = v; }
#endif
static inline __attribute__((always_inline)) void wino_in_1d(float* out, size_t os, const float* in, size_t is, int m) {
    for (int l = 0; l < VW; l += WL, in += WL, out += WL) {
        wlanes d0 = wl_load(in), d1 = wl_load(in + is), d2 = wl_load(in + 2 * is), d3 = wl_load(in + 3 * is);
        if (m == 2) {
            wl_store(out, d0 - d2), wl_store(out + os, d1 + d2), wl_store(out + 2 * os, d2 - d1), wl_store(out + 3 * os, d1 - d3);
            continue;
        }
        wlanes d4 = wl_load(in + 4 * is), d5 = wl_load(in + 5 * is);
        wlanes p = d4 - 4 * d2, q = d3 - 4 * d1, r = d4 - d2, s = 2 * (d3 - d1);
        wl_store(out, 4 * d0 - 5 * d2 + d4), wl_store(out + os, p + q), wl_store(out + 2 * os, p - q);
        wl_store(out + 3 * os, r + s), wl_store(out + 4 * os, r - s), wl_store(out + 5 * os, 4 * d1 - 5 * d3 + d5);
    }
}

static inline __attribute__((always_inline)) void wino_out_1d(float* out, size_t os, const float* in, size_t is, int m) {
    for (int l = 0; l < VW; l += WL, in += WL, out += WL) {
        wlanes v0 = wl_load(in), v1 = wl_load(in + is), v2 = wl_load(in + 2 * is), v3 = wl_load(in + 3 * is);
        if (m == 2) {
            wl_store(out, v0 + v1 + v2), wl_store(out + os, v1 - v2 - v3);
            continue;
        }
        wlanes v4 = wl_load(in + 4 * is), v5 = wl_load(in + 5 * is);
        wlanes p = v1 + v2, q = v1 - v2, r = v3 + v4, s = v3 - v4;
        wl_store(out, v0 + p + r), wl_store(out + os, q + 2 * s), wl_store(out + 2 * os, p + 4 * r), wl_store(out + 3 * os, q + 8 * s + v5);
    }
}

// A (m values to a), for the weight gradient's dM = A dY A^T: A^T's transpose.
static inline __attribute__((always_inline)) void wino_dy_1d(float* out, size_t os, const float* in, size_t is, int m) {
    for (int l = 0; l < VW; l += WL, in += WL, out += WL) {
        wlanes d0 = wl_load(in), d1 = wl_load(in + is);
        if (m == 2) {
            wl_store(out, d0), wl_store(out + os, d0 + d1), wl_store(out + 2 * os, d0 - d1), wl_store(out + 3 * os, -d1);
            continue;
        }
        wlanes d2 = wl_load(in + 2 * is), d3 = wl_load(in + 3 * is);
        wlanes p = d0 + d2, q = d1 + d3, r = d0 + 4 * d2, s = 2 * d1 + 8 * d3;
        wl_store(out, d0), wl_store(out + os, p + q), wl_store(out + 2 * os, p - q);
        wl_store(out + 3 * os, r + s), wl_store(out + 4 * os, r - s), wl_store(out + 5 * os, d3);
    }
}

// V = B^T d B of tile `tile`'s VW-channel blocks, as row q of each V_xi.
static inline __attribute__((always_inline)) void wino_v(float* V, const float* xt, int q, size_t tile, WinoGeom w, int m) {
    int a = m + 2, b = (int)(tile / ((size_t)w.ty * w.tx)), ty = (int)(tile / w.tx % w.ty), tx = (int)(tile % w.tx);
    float t[36 * VW];
    for (int cb = 0; cb < w.CiP / VW; cb++) {
        const float* src = xt + (((size_t)b * (w.CiP / VW) + cb) * w.Ht * w.Wt + (size_t)ty * m * w.Wt + tx * m) * VW;
        for (int j = 0; j < a; j++) wino_in_1d(t + j * VW, (size_t)a * VW, src + j * VW, (size_t)w.Wt * VW, m);   // B^T d
        for (int i = 0; i < a; i++)                                                                  // (B^T d) B
            wino_in_1d(V + (size_t)i * a * w.vs + (size_t)q * w.CiP + cb * VW, w.vs, t + i * a * VW, VW, m);
    }
}

// One chunk of tiles [q0, q0 + nt): V = B^T d B of each tile's VW-channel blocks, the a^2
// matrix products, then Y = A^T M A written (bias != NULL: = bias + Y; else +=) into out.
static inline __attribute__((always_inline)) void wino_chunk(float* out, const float* bias, const float* xt,
        const float* U, float* V, float* M, size_t q0, int nt, int C_out, int H, int W, WinoGeom w, int m) {
    int a = m + 2;   // m is a constant here (the callers pass 4 or 2): the transforms unroll
    size_t a2 = (size_t)a * a;
    float t[36 * VW], y[16 * VW];
    for (int q = 0; q < nt; q++) wino_v(V, xt, q, q0 + q, w, m);
    // M_xi = V_xi U_xi by 17.2's register tile, with one tap: CONV_MR tiles (rows of V,
    // broadcast) x nv vectors of output channels (rows of U, loaded), summed over c and
    // stored where M keeps it. (Rows past nt are computed from the last one and dropped.)
    int zero = 0, nr = w.nv * VW;
    for (size_t xi = 0; xi < a2; xi++)
        for (int o0 = 0; o0 < w.CoM; o0 += nr)
            for (int r0 = 0; r0 < nt; r0 += CONV_MR) {
                int rows = nt - r0 < CONV_MR ? nt - r0 : CONV_MR;
                float* dst = M + xi * w.ms + (size_t)o0 * w.nt + (size_t)r0 * nr;
                const float *v = V + xi * w.vs + (size_t)r0 * w.CiP, *u = U + xi * w.CiP * w.CoM + o0;
                if (w.nv == CONV_NV) conv_tile(dst, v, w.CiP, 1, rows, u, w.CiP, w.CoM, 1, &zero, CONV_MR, CONV_NV);
                else                 conv_tile(dst, v, w.CiP, 1, rows, u, w.CiP, w.CoM, 1, &zero, CONV_MR, CONV_NV_SMALL);
            }
    for (int q = 0; q < nt; q++) {
        size_t tile = q0 + q;
        int b = (int)(tile / ((size_t)w.ty * w.tx)), ty = (int)(tile / w.tx % w.ty), tx = (int)(tile % w.tx);
        for (int ob = 0; ob < (C_out + VW - 1) / VW; ob++) {
            const float* src = M + (size_t)ob / w.nv * w.nv * VW * w.nt + (size_t)q * nr + ob % w.nv * VW;
            for (int j = 0; j < a; j++)                                                              // A^T M
                wino_out_1d(t + j * VW, (size_t)a * VW, src + (size_t)j * w.ms, (size_t)a * w.ms, m);
            for (int i = 0; i < m; i++) wino_out_1d(y + i * m * VW, VW, t + i * a * VW, VW, m);     // (A^T M) A
            for (int l = 0; l < VW && ob * VW + l < C_out; l++) {
                int o = ob * VW + l;
                float* dst = out + ((size_t)b * C_out + o) * H * W;
                for (int i = 0; i < m && ty * m + i < H; i++)
                    for (int j = 0; j < m && tx * m + j < W; j++) {
                        float* p = dst + (size_t)(ty * m + i) * W + tx * m + j;
                        *p = bias ? bias[o] + y[(i * m + j) * VW + l] : *p + y[(i * m + j) * VW + l];
                    }
            }
        }
    }
}

// out (B, C_out, H, W) = bias + (or, bias NULL, +=) the 3x3 stride-1 conv of x (read at
// x[c plane + y pitch + x]) with weight (C_out, C_in, 3, 3), by Winograd's F(m x m, 3 x 3).
static void conv_winograd(float* out, const float* x, size_t plane, int pitch, const float* weight, const float* bias,
                          int B, int C_in, int C_out, int H, int W, int m, float* ws) {
    WinoGeom w = wino_geom(m, B, C_in, C_out, H, W);
    size_t a2 = (size_t)w.a * w.a, per_thread = a2 * (w.vs + w.ms);
    float* xt = ws;
    float* U = xt + (size_t)B * w.CiP * w.Ht * w.Wt;
    float* mine = U + a2 * w.CiP * w.CoM;
    wino_filters(U, weight, C_in, C_out, w);
    wino_input(xt, x, plane, pitch, B, C_in, H, W, w);
    // chunks of at most w.nt tiles, as many as a multiple of the threads (each tile's sums
    // are its own: the chunks change no bits)
    int chunks = (int)((w.n_tiles + w.nt - 1) / w.nt);
    chunks = (chunks + kernel_threads - 1) / kernel_threads * kernel_threads;
    int size = round_up((int)((w.n_tiles + chunks - 1) / chunks), CONV_MR);
    chunks = (int)((w.n_tiles + size - 1) / size);
    #pragma omp parallel for schedule(static) num_threads(kernel_threads)
    for (int k = 0; k < chunks; k++) {
        float* V = mine + (size_t)thread_id() * per_thread;
        size_t q0 = (size_t)k * size;
        int nt = w.n_tiles - q0 < (size_t)size ? (int)(w.n_tiles - q0) : size;
        if (m == 4) wino_chunk(out, bias, xt, U, V, V + a2 * w.vs, q0, nt, C_out, H, W, w, 4);
        else        wino_chunk(out, bias, xt, U, V, V + a2 * w.vs, q0, nt, C_out, H, W, w, 2);
    }
}

// The weight gradient, the forward's adjoint: with dM = A dY A^T for each tile's m x m
// output gradient (zero past the image), dweight[o][c] += G^T dU[c][o] G, where
//   dU_xi[c][o] = sum over tiles V_xi[tile][c] dM_xi[tile][o]
// by 17.2's register tile, summing over tiles (rows c of V, a tile apart: ka = CiP). Chunks
// of tiles run in order, each split over xi and channel blocks: the bits do not depend on the threads.
static void conv_winograd_dweight(float* dweight, const float* x, size_t plane, int pitch, const float* dy,
                                  int B, int C_in, int C_out, int H, int W, int m, float* ws) {
    WinoGeom w = wino_geom(m, B, C_in, C_out, H, W), wd = w;
    wd.CiP = w.CoM;   // dy copied as the input is, in M's channel blocks
    int a = w.a, nr = w.nv * VW, nc = (w.CiP + CONV_MR - 1) / CONV_MR, no = w.CoM / nr, zero = 0;
    size_t a2 = (size_t)a * a, img = (size_t)w.Ht * w.Wt * VW;
    float *xt = ws, *dyt = xt + (size_t)B * w.CiP * w.Ht * w.Wt, *dU = dyt + (size_t)B * w.CoM * w.Ht * w.Wt;
    float *V = dU + a2 * w.CiP * w.CoM, *M = V + a2 * w.vs;
    wino_input(xt, x, plane, pitch, B, C_in, H, W, w);
    wino_input(dyt, dy, (size_t)H * W, W, B, C_out, H, W, wd);
    memset(dU, 0, a2 * w.CiP * w.CoM * sizeof(float));
    for (size_t q0 = 0; q0 < w.n_tiles; q0 += w.nt) {
        int nt = w.n_tiles - q0 < (size_t)w.nt ? (int)(w.n_tiles - q0) : w.nt;
        #pragma omp parallel for schedule(static) num_threads(kernel_threads)
        for (int q = 0; q < nt; q++) {
            float t[36 * VW];
            size_t tile = q0 + q;
            int b = (int)(tile / ((size_t)w.ty * w.tx)), ty = (int)(tile / w.tx % w.ty), tx = (int)(tile % w.tx);
            wino_v(V, xt, q, tile, w, m);
            for (int ob = 0; ob < w.CoM / VW; ob++) {   // dM = A dY A^T, where M keeps the forward's
                const float* src = dyt + ((size_t)b * (w.CoM / VW) + ob) * img + ((size_t)(ty * m + 1) * w.Wt + tx * m + 1) * VW;
                float* dst = M + (size_t)ob * VW / nr * nr * w.nt + (size_t)q * nr + ob * VW % nr;
                for (int j = 0; j < m; j++) wino_dy_1d(t + j * VW, (size_t)m * VW, src + j * VW, (size_t)w.Wt * VW, m);
                for (int i = 0; i < a; i++) wino_dy_1d(dst + (size_t)i * a * w.ms, w.ms, t + i * m * VW, VW, m);
            }
        }
        #pragma omp parallel for schedule(static) num_threads(kernel_threads)
        for (int item = 0; item < (int)a2 * nc * no; item++) {
            int xi = item / (nc * no), c0 = item / no % nc * CONV_MR, ob = item % no;
            int rows = w.CiP - c0 < CONV_MR ? w.CiP - c0 : CONV_MR;
            float tile[CONV_MR * CONV_NR_MAX], *u = dU + ((size_t)xi * w.CiP + c0) * w.CoM + ob * nr;
            const float *v = V + xi * w.vs + c0, *d = M + xi * w.ms + (size_t)ob * nr * w.nt;
            if (w.nv == CONV_NV) conv_tile(tile, v, 1, w.CiP, rows, d, nt, nr, 1, &zero, CONV_MR, CONV_NV);
            else                 conv_tile(tile, v, 1, w.CiP, rows, d, nt, nr, 1, &zero, CONV_MR, CONV_NV_SMALL);
            for (int r = 0; r < rows; r++)
                for (int j = 0; j < nr; j++) u[(size_t)r * w.CoM + j] += tile[r * nr + j];
        }
    }
    const float* G = m == 4 ? &WINO4_G[0][0] : &WINO2_G[0][0];
    #pragma omp parallel for schedule(static) num_threads(kernel_threads)
    for (int c = 0; c < C_in; c++)   // dweight[o][c] += G^T dU G, 64 output channels at a time
        for (int o0 = 0; o0 < C_out; o0 += 64) {
            float gd[3][6][64] = {{{0}}}, dg[9][64] = {{0}};
            int n = C_out - o0 < 64 ? C_out - o0 : 64;
            for (int k = 0; k < a; k++)
                for (int l = 0; l < a; l++) {
                    const float* u = dU + ((size_t)(k * a + l) * w.CiP + c) * w.CoM + o0;
                    for (int i = 0; i < 3; i++)
                        for (int o = 0; o < n; o++) gd[i][l][o] += G[k * 3 + i] * u[o];
                }
            for (int i = 0; i < 3; i++)
                for (int j = 0; j < 3; j++)
                    for (int l = 0; l < a; l++)
                        for (int o = 0; o < n; o++) dg[i * 3 + j][o] += gd[i][l][o] * G[l * 3 + j];
            for (int o = 0; o < n; o++)
                for (int k = 0; k < 9; k++) dweight[((size_t)(o0 + o) * C_in + c) * 9 + k] += dg[k][o];
        }
}

// A producer can write a 3x3 stride-1 conv's input straight into its padded grids
// (B x C_in grids of conv_input_floats(H, W) floats, border and slack zero): then
// `in_grids` is 1 and the conv copies nothing. GroupNorm+SiLU does (17.4).
static size_t conv_input_floats_fast(int H, int W) { return conv_geom(H, W, 3, 1).P; }

static void conv_forward(float* out, const float* inp, int in_grids, const float* weight, const float* bias,
                         int B, int C_in, int H, int W, int C_out, int K, int stride, float* ws) {
    ConvGeom g = conv_geom(H, W, K, stride);
    size_t total;
    ConvWork w = conv_work(ws, B, C_in, H, W, C_out, K, stride, kernel_threads, &total);
    int m = K == 3 && stride == 1 ? wino_tile(B, C_in, C_out, H, W) : 0;
    if (m) conv_winograd(out, in_grids ? inp + g.Wp + 1 : inp, in_grids ? g.S : (size_t)H * W, in_grids ? g.Wp : W,
                         weight, bias, B, C_in, C_out, H, W, m, w.planes);
    else conv_direct(out, in_grids ? inp : conv_grids(w.planes, inp, B, C_in, g), weight, bias, B, C_in, C_out, &g, 1);
}

// out (B, C_out, H/stride, W/stride). ws: conv2d_workspace_floats(...) floats of scratch.
static void conv2d_forward_fast(float* out, const float* inp, const float* weight, const float* bias,
                           int B, int C_in, int H, int W, int C_out, int K, int stride, float* ws) {
    conv_forward(out, inp, 0, weight, bias, B, C_in, H, W, C_out, K, stride, ws);
}

static void conv_backward(float* dinp, float* dweight, float* dbias, const float* dout,
                          const float* inp, int in_grids, const float* weight,
                          int B, int C_in, int H, int W, int C_out, int K, int stride, float* ws) {
    ConvGeom g = conv_geom(H, W, K, stride);
    int HWo = g.H * g.W, CoP = round_up(C_out, CONV_DW_CO);
    size_t total;
    ConvWork w = conv_work(ws, B, C_in, H, W, C_out, K, stride, kernel_threads, &total);
    conv_dbias(dbias, dout, B, C_out, HWo);
    int mw = K == 3 && stride == 1 ? wino_tile(B, C_in, C_out, H, W) : 0;
    if (mw) conv_winograd_dweight(dweight, in_grids ? inp + g.Wp + 1 : inp, in_grids ? g.S : (size_t)H * W,
                                  in_grids ? g.Wp : W, dout, B, C_in, C_out, H, W, mw, w.planes);
    else {
        const float* x = in_grids ? inp : conv_grids(w.planes, inp, B, C_in, g);
        conv_transpose_dy(w.dyt, dout, B, C_out, CoP, g);
        conv_dweight(dweight, w.dwacc, x, w.dyt, B, C_in, C_out, g);
    }
    if (!dinp) return;
    if (stride != 1) { conv_strided_dinp(dinp, w.dcol, dout, weight, B, C_in, H, W, C_out, K, stride); return; }
    conv_flip_weights(w.flipped, weight, C_out, C_in, g.T);
    int m = K == 3 ? wino_tile(B, C_out, C_in, H, W) : 0;
    if (m) conv_winograd(dinp, dout, (size_t)H * W, W, w.flipped, NULL, B, C_out, C_in, H, W, m, w.planes);
    else conv_direct(dinp, conv_grids(w.planes, dout, B, C_out, g), w.flipped, NULL, B, C_out, C_in, &g, 1);
}

// dinp may be NULL (the network input needs no gradient).
static void conv2d_backward_fast(float* dinp, float* dweight, float* dbias, const float* dout,
                            const float* inp, const float* weight,
                            int B, int C_in, int H, int W, int C_out, int K, int stride, float* ws) {
    conv_backward(dinp, dweight, dbias, dout, inp, 0, weight, B, C_in, H, W, C_out, K, stride, ws);
}

// The 3x3 conv of section 14's unit: its saved input's padded grids are read as they are.
static void conv3x3_forward_fast(float* out, const float* a, const float* weight, const float* bias,
                                 int B, int C_in, int H, int W, int C_out, float* ws) {
    conv_forward(out, a, 1, weight, bias, B, C_in, H, W, C_out, 3, 1, ws);
}

static void conv3x3_backward_fast(float* da, float* dweight, float* dbias, const float* dout, const float* a,
                                  const float* weight, int B, int C_in, int H, int W, int C_out, float* ws) {
    conv_backward(da, dweight, dbias, dout, a, 1, weight, B, C_in, H, W, C_out, 3, 1, ws);
}

static void layers_init_fast(void) { gemm_init(); }

// ---- 17.3 Linear and SiLU: linear_forward_fast / silu_forward_fast and their backward ----
// Linear (16.2) as two matmuls (17.1).
static void linear_forward_fast(float* out, const float* inp, const float* weight, const float* bias,
                           int B, int C_in, int C_out) {
    for (int b = 0; b < B; b++) memcpy(out + (size_t)b * C_out, bias, C_out * sizeof(float));
    matmul(out, inp, weight, B, C_out, C_in, C_in, C_in, C_out, 0, 1, 1);
}

static void linear_backward_fast(float* dinp, float* dweight, float* dbias, const float* dout,
                            const float* inp, const float* weight, int B, int C_in, int C_out) {
    matmul(dweight, dout, inp, C_out, C_in, B, C_out, C_in, C_in, 1, 0, 1);  // dW += dout^T . inp
    for (int b = 0; b < B; b++)
        for (int o = 0; o < C_out; o++) dbias[o] += dout[(size_t)b * C_out + o];
    if (dinp) matmul(dinp, dout, weight, B, C_in, C_out, C_out, C_in, C_in, 0, 0, 1);  // dinp += dout . W
}

// SiLU (16.3) runs on every activation of the network, twice per training step, so its
// exp must vectorise. libm's expf is a function call the compiler cannot vectorise; this
// one is plain arithmetic: x = n ln2 + r with |r| <= ln2/2 (ln2 split in two parts so
// n ln2 is exact), Cephes' degree-6 polynomial for e^r, and 2^n written straight
// into the exponent bits. Relative error about 1e-7 (tests/ checks < 2e-7 against exp);
// a NaN stays NaN, and x is clamped to [-87, 88] where expf would under/overflow.
static inline float exp_approx(float x) {
    x = x > 88.0f ? 88.0f : x < -87.0f ? -87.0f : x;   // a NaN fails both tests and stays
    const float shift = 12582912.0f;                   // 1.5 * 2^23: adding it rounds to an integer
    float t = x * 1.44269504f + shift, n = t - shift;  // n = round(x / ln2), in [-126, 127]
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    uint32_t bits;                                     // t's low mantissa bits hold n
    memcpy(&bits, &t, sizeof bits);
    bits = (bits + 127u) << 23;                        // the float 2^n
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

static inline float sigmoidf(float x) { return 1.0f / (1.0f + exp_approx(-x)); }

static void silu_forward_fast(float* out, const float* inp, size_t N) {
    for (size_t i = 0; i < N; i++) out[i] = inp[i] * sigmoidf(inp[i]);
}

// d silu / dx = s (1 + x (1 - s)), s = sigmoid(x)
static inline float silu_grad(float x) {
    float s = sigmoidf(x);
    return s * (1.0f + x * (1.0f - s));
}

static void silu_backward_fast(float* dinp, const float* dout, const float* inp, size_t N) {
    for (size_t i = 0; i < N; i++) dinp[i] += dout[i] * silu_grad(inp[i]);
}

// ---- 17.4 GroupNorm (+ SiLU), and into a conv's grids: groupnorm_forward_fast and friends ----
// GroupNorm of 16.4, its SiLU fused: one pass over memory instead of two, and nothing
// but mean and rstd (B*G floats) is stored. The backward pass recomputes xhat and n
// from the input, which costs a few flops and saves two activation tensors per layer.
// The statistics of each (image, group) are sums over its C/G x HW contiguous values, in
// blocks of 4096 in float lanes, each block's lanes then added in double; the backward
// pass sums each channel in lanes, then in double.

// Where the output goes. grid_W = 0: out is (B, C, H, W) like inp. grid_W = W: out is
// the padded grids of a 3x3 conv's input (17.2), so that conv need not copy it.
typedef struct { int H, W, pitch, off; size_t plane; } GnLayout;

static GnLayout gn_layout(int HW, int grid_W) {
    int W = grid_W ? grid_W : HW, H = HW / W;
    ConvGeom grid = conv_geom(H, W, 3, 1);
    return (GnLayout){H, W, grid_W ? grid.Wp : W, grid_W ? grid.Wp + 1 : 0, grid_W ? grid.P : (size_t)HW};
}

// out = [silu](gamma xhat + beta) for group g of image b, with its statistics m, r.
static void gn_apply_group(float* out, const float* inp, int b, int g, float m, float r,
                           const float* gamma, const float* beta, int C, int HW, int Cg, int silu, GnLayout L) {
    for (int c = g * Cg; c < (g + 1) * Cg; c++) {
        float sc = r * gamma[c], sh = beta[c] - m * sc;
        for (int h = 0; h < L.H; h++) {
            const float* x = inp + ((size_t)b * C + c) * HW + (size_t)h * L.W;
            float* y = out + ((size_t)b * C + c) * L.plane + L.off + (size_t)h * L.pitch;
            if (silu) for (int i = 0; i < L.W; i++) { float n = x[i] * sc + sh; y[i] = n * sigmoidf(n); }
            else      for (int i = 0; i < L.W; i++) y[i] = x[i] * sc + sh;
        }
    }
}

// sum_i (x_i - shift) and sum_i (x_i - shift)^2 over n floats: in lanes, 4096 values at
// a time, each block's lanes then added in double (a group can hold 10^5 values).
static void lane_sums(const float* x, size_t n, float shift, double* s, double* ss) {
    for (size_t i0 = 0; i0 < n; i0 += 4096) {
        size_t end = i0 + 4096 < n ? i0 + 4096 : n, i = i0;
        float a[LANES] = {0}, q[LANES] = {0};
#if DDPM_SIMD
        vecf va[LANES / VW] = {{0}}, vq[LANES / VW] = {{0}};
        for (; i + LANES <= end; i += LANES)
            for (int k = 0; k < LANES / VW; k++) {
                vecf d = vload(x + i + k * VW) - shift;
                va[k] += d;
                vq[k] += d * d;
            }
        memcpy(a, va, sizeof a);
        memcpy(q, vq, sizeof q);
#else
        for (; i + LANES <= end; i += LANES)
            for (int l = 0; l < LANES; l++) { float d = x[i + l] - shift; a[l] += d; q[l] += d * d; }
#endif
        for (; i < end; i++) { float d = x[i] - shift; a[0] += d; q[0] += d * d; }
        for (int l = 0; l < LANES; l++) { *s += a[l]; *ss += q[l]; }
    }
}

// mean, rstd: (B, G), saved for the backward pass. Two passes over the group (it is in
// cache): the mean, then the variance around it, which keeps var >= 0 and accurate
// even when |mean| >> std; then the output, while the group is still in cache.
static void groupnorm_forward_into(float* out, float* mean, float* rstd, const float* inp,
                                   const float* gamma, const float* beta, int B, int C, int HW, int G, int silu,
                                   int grid_W) {
    int Cg = C / G;
    size_t n = (size_t)Cg * HW;
    GnLayout L = gn_layout(HW, grid_W);
    #pragma omp parallel for schedule(static) if ((size_t)B * C * HW > 65536)
    for (int bg = 0; bg < B * G; bg++) {
        const float* x = inp + ((size_t)(bg / G) * C + (size_t)(bg % G) * Cg) * HW;  // a group is contiguous
        double s = 0, ss = 0, d = 0, dd = 0;
        lane_sums(x, n, 0.0f, &s, &ss);
        float m = (float)(s / n);
        lane_sums(x, n, m, &d, &dd);
        double var = dd / n - (d / n) * (d / n);   // d/n: the float mean's own rounding
        mean[bg] = m;
        rstd[bg] = (float)(1.0 / sqrt(fmax(var, 0.0) + GN_EPS));
        gn_apply_group(out, inp, bg / G, bg % G, m, rstd[bg], gamma, beta, C, HW, Cg, silu, L);
    }
}

static void groupnorm_forward_fast(float* out, float* mean, float* rstd, const float* inp,
                                   const float* gamma, const float* beta, int B, int C, int HW, int G, int silu) {
    groupnorm_forward_into(out, mean, rstd, inp, gamma, beta, B, C, HW, G, silu, 0);
}

// a = silu(groupnorm(x)), written as the padded grids the next 3x3 conv reads (17.2).
static void groupnorm_silu_conv_input_fast(float* a, float* mean, float* rstd, const float* x, const float* gamma,
                                           const float* beta, int B, int C, int H, int W, int G) {
    groupnorm_forward_into(a, mean, rstd, x, gamma, beta, B, C, H * W, G, 1, W);
}

// dn = dout * silu'(n) (or dout without the SiLU), for one channel of HW values.
static inline float gn_dn(float dy, float xhat, float gamma, float beta, int silu) {
    return silu ? dy * silu_grad(gamma * xhat + beta) : dy;
}

// With dn = dout * silu'(n) (or dout without the SiLU):
//   dbeta_c += sum dn,  dgamma_c += sum dn xhat,  dxhat = dn gamma,
//   dx = rstd (dxhat - mean_group(dxhat) - xhat mean_group(dxhat xhat)).
// Threads split the groups; each group runs over the images in order, so dgamma and
// dbeta are summed in the same order whatever the number of threads. dn costs an exp
// and a division per value, so the first pass keeps it (on the stack, when the group
// fits in GN_KEEP floats) for the second.
#define GN_KEEP 16384
static void groupnorm_backward_fast(float* dinp, float* dgamma, float* dbeta, const float* dout,
                                    const float* inp, const float* gamma, const float* beta,
                                    const float* mean, const float* rstd, int B, int C, int HW, int G, int silu) {
    int Cg = C / G;
    #pragma omp parallel for schedule(static) if ((size_t)B * C * HW > 65536)
    for (int g = 0; g < G; g++)
        for (int b = 0; b < B; b++) {
            int bg = b * G + g, kept = Cg * HW <= GN_KEEP;
            float m = mean[bg], r = rstd[bg], keep[GN_KEEP];
            double sum_dxhat = 0, sum_dxhat_xhat = 0;
            for (int c = g * Cg; c < (g + 1) * Cg; c++) {
                const float* x = inp + ((size_t)b * C + c) * HW;
                const float* dy = dout + ((size_t)b * C + c) * HW;
                float ga = gamma[c], be = beta[c];
                double sdn = 0, sdn_xhat = 0;
                for (int i0 = 0; i0 < HW; i0 += 256) {   // dn and xhat 256 at a time, then their sums
                    int n = HW - i0 < 256 ? HW - i0 : 256;
                    float xh[256], local[256];
                    float* dn = kept ? keep + (size_t)(c - g * Cg) * HW + i0 : local;
                    for (int i = 0; i < n; i++) {
                        xh[i] = (x[i0 + i] - m) * r;
                        dn[i] = gn_dn(dy[i0 + i], xh[i], ga, be, silu);
                    }
                    for (int i = 0; i < n; i++) xh[i] *= dn[i];
                    sdn += lane_sum(dn, n);
                    sdn_xhat += lane_sum(xh, n);
                }
                dbeta[c] += (float)sdn;
                dgamma[c] += (float)sdn_xhat;
                sum_dxhat += sdn * ga;
                sum_dxhat_xhat += sdn_xhat * ga;
            }
            float mean_dxhat = (float)(sum_dxhat / ((double)Cg * HW));
            float mean_dxhat_xhat = (float)(sum_dxhat_xhat / ((double)Cg * HW));
            for (int c = g * Cg; c < (g + 1) * Cg; c++) {
                const float* x = inp + ((size_t)b * C + c) * HW;
                const float* dy = dout + ((size_t)b * C + c) * HW;
                float* dx = dinp + ((size_t)b * C + c) * HW;
                float ga = gamma[c], be = beta[c];
                if (kept) {
                    const float* dn = keep + (size_t)(c - g * Cg) * HW;
                    for (int i = 0; i < HW; i++)
                        dx[i] += r * (dn[i] * ga - mean_dxhat - (x[i] - m) * r * mean_dxhat_xhat);
                } else {
                    for (int i = 0; i < HW; i++) {
                        float xhat = (x[i] - m) * r, dn = gn_dn(dy[i], xhat, ga, be, silu);
                        dx[i] += r * (dn * ga - mean_dxhat - xhat * mean_dxhat_xhat);
                    }
                }
            }
        }
}

// ---- 17.5 Dropout on a conv input: dropout_conv_input_fast ----
// dropout_forward of 16.5, in place on the padded grids of 17.2 that hold a ResBlock's
// (B, C, H, W) activation (conv2 reads them as they are); element i is pixel i of the
// plain (B, C, H, W) layout, so the mask is the reference's.
static void dropout_conv_input_fast(float* grid, int B, int C, int H, int W, float p, uint64_t key) {
    float scale = 1.0f / (1.0f - p);
    ConvGeom g = conv_geom(H, W, 3, 1);
    #pragma omp parallel for schedule(static) if ((size_t)B * C * H * W > 65536)
    for (int bc = 0; bc < B * C; bc++)
        for (int h = 0; h < H; h++) {
            float* y = grid + (size_t)bc * g.P + (size_t)(h + 1) * g.Wp + 1;
            size_t i0 = ((size_t)bc * H + h) * W;
            for (int w = 0; w < W; w++) y[w] = dropout_keep(key, i0 + w, p) ? y[w] * scale : 0.0f;
        }
}

// Section 14's unit on the grids: GroupNorm+SiLU writes the conv's grid (17.4), dropout
// runs on it, the conv reads it (17.2); the backward is section 14's on the grid.
static void norm_silu_conv_forward_fast(float* h, float* a, float* mean, float* rstd, const float* x,
                                        const GroupNorm* n, const Conv2d* c, int B, int H, int W, Dropout d,
                                        float* ws) {
    groupnorm_silu_conv_input_fast(a, mean, rstd, x, n->gamma, n->beta, B, n->C, H, W, n->G);
    if (d.p > 0) dropout_conv_input_fast(a, B, n->C, H, W, d.p, d.key);
    conv3x3_forward_fast(h, a, c->w, c->b, B, c->C_in, H, W, c->C_out, ws);
}

static void norm_silu_conv_backward_fast(float* dx, GroupNorm* n, Conv2d* c, const float* dh, const float* x,
                                         const float* a, const float* mean, const float* rstd, int B, int H, int W,
                                         Dropout d, float* tmp1, float* tmp2, float* ws) {
    size_t N = (size_t)B * n->C * H * W;
    float* da = tmp1;
    zero(da, N);
    conv3x3_backward_fast(da, c->dw, c->db, dh, a, c->w, B, c->C_in, H, W, c->C_out, ws);
    if (d.p > 0) {
        zero(tmp2, N);
        dropout_backward(tmp2, da, N, d.p, d.key);
        da = tmp2;
    }
    groupnorm_backward(dx, n->dgamma, n->dbeta, da, x, n->gamma, n->beta, mean, rstd, B, n->C, H * W, n->G, 1);
}

// ---- 17.6 Attention: attention_forward_fast / attention_backward_fast ----
// Attention of 16.6. It keeps att transposed, attT[j, i] = att[i, j] (B, N, N), saved
// for the backward pass: then attT = k^T q and out = v attT are plain matmuls (no transposed
// copy of an N x N operand), and each softmax runs down a column of attT, which
// vectorises across the columns i. Threads take whole images (the matmuls inside then
// run on one thread), so each image's sums keep one order.

// attT[:, i] = softmax over j of (attT[j, i] * scale), for every column i, in place;
// 256 columns at a time, their max and sum built row by row (sums in double). The scale
// (> 0) goes inside the exponent, exp(scale (a - max)), so the max pass only reads.
static void softmax_columns(float* a, int N, float scale) {
    for (int i0 = 0; i0 < N; i0 += 256) {
        int n = N - i0 < 256 ? N - i0 : 256;
        float mx[256], inv[256];
        double s[256];
        for (int i = 0; i < n; i++) { mx[i] = -INFINITY; s[i] = 0; }
        for (int j = 0; j < N; j++) {
            const float* row = a + (size_t)j * N + i0;
            for (int i = 0; i < n; i++) mx[i] = row[i] > mx[i] ? row[i] : mx[i];
        }
        for (int j = 0; j < N; j++) {
            float* row = a + (size_t)j * N + i0;
            for (int i = 0; i < n; i++) row[i] = exp_approx((row[i] - mx[i]) * scale);
            for (int i = 0; i < n; i++) s[i] += row[i];
        }
        for (int i = 0; i < n; i++) inv[i] = (float)(1.0 / s[i]);
        for (int j = 0; j < N; j++) {
            float* row = a + (size_t)j * N + i0;
            for (int i = 0; i < n; i++) row[i] *= inv[i];
        }
    }
}

// attT == NULL (sampling: there is no backward pass to save it for): each thread's
// attT lives in its own N*N slice of scratch, which stays in cache.
static void attention_forward_fast(float* out, float* attT, const float* q, const float* k, const float* v,
                              int B, int C, int N, float* scratch) {
    float scale = 1.0f / sqrtf((float)C);
    #pragma omp parallel for schedule(static) if (B > 1) num_threads(kernel_threads)
    for (int b = 0; b < B; b++) {
        size_t o = (size_t)b * C * N;
        float* a = attT ? attT + (size_t)b * N * N : scratch + (size_t)(B > 1 ? thread_id() : 0) * N * N;
        matmul(a, k + o, q + o, N, N, C, N, N, N, 1, 0, 0);   // attT = k^T q
        softmax_columns(a, N, scale);
        matmul(out + o, v + o, a, C, N, N, N, N, N, 0, 0, 0);  // out = v attT
    }
}

// datt: scratch of N*N floats per thread, for dattT.
//   dv += dout attT^T,  dattT = v^T dout,
//   dsT[j, i] = attT[j, i] (dattT[j, i] - sum_j' attT[j', i] dattT[j', i]) / sqrt(C),
//   dq += k dsT,  dk += q dsT^T
static void attention_backward_fast(float* dq, float* dk, float* dv, const float* dout,
                               const float* q, const float* k, const float* v, const float* attT,
                               int B, int C, int N, float* datt) {
    float scale = 1.0f / sqrtf((float)C);
    #pragma omp parallel for schedule(static) if (B > 1) num_threads(kernel_threads)
    for (int b = 0; b < B; b++) {
        size_t o = (size_t)b * C * N;
        const float* a = attT + (size_t)b * N * N;
        float* da = datt + (size_t)(B > 1 ? thread_id() : 0) * N * N;
        matmul(dv + o, dout + o, a, C, N, N, N, N, N, 0, 1, 1);
        matmul(da, v + o, dout + o, N, N, C, N, N, N, 1, 0, 0);
        for (int i0 = 0; i0 < N; i0 += 256) {   // softmax backward, down the columns
            int n = N - i0 < 256 ? N - i0 : 256;
            double dot[256];
            float d[256];
            for (int i = 0; i < n; i++) dot[i] = 0;
            for (int j = 0; j < N; j++)
                for (int i = 0; i < n; i++) dot[i] += a[(size_t)j * N + i0 + i] * da[(size_t)j * N + i0 + i];
            for (int i = 0; i < n; i++) d[i] = (float)dot[i];
            for (int j = 0; j < N; j++) {
                const float* ar = a + (size_t)j * N + i0;
                float* dr = da + (size_t)j * N + i0;
                for (int i = 0; i < n; i++) dr[i] = ar[i] * (dr[i] - d[i]) * scale;
            }
        }
        matmul(dq + o, k + o, da, C, N, N, N, N, N, 0, 0, 1);
        matmul(dk + o, q + o, da, C, N, N, N, N, N, 0, 1, 1);
    }
}

// ---- 17.7 Upsampling: upsample_conv_forward_fast / upsample_conv_backward_fast ----
// The official Upsample of 16.7, nearest-neighbour 2x then a 3x3 convolution:
//   up[c, 2h + p, 2w + q] = x[c, h, w],   out = conv3x3(up).
// Here up is never materialised. Every output pixel of phase (p, q) (row parity p, column
// parity q) reads the same 2 x 2 block of x, rows h + a + p - 1, columns w + b + q - 1
// (a, b in {0, 1}), so that phase of out is a 2x2 convolution of x with summed weights:
//   wc[p, q][o, c, a, b] = sum of weight[o, c, i, j] over taps i with up_tap(p, i) = a
//                          and j with up_tap(q, j) = b.
// Four 2x2 convolutions at the low resolution do 16 multiply-adds per input pixel
// where the 3x3 at the high resolution does 36. They run on the direct kernel of 17.2
// (4 taps, output written to every second pixel); the backward pass is the same
// kernel's, per phase, and the phase weight gradients are summed back onto the 3x3 taps.

// Which of the 2 low-resolution rows (0: upper) tap i of output phase p reads.
static int up_tap(int p, int i) { return (p + i + 1) / 2 - p; }

// The phase-(p, q) geometry on low-resolution grids g (H x W). Forward: taps (a, b) at
// rows a + p, columns b + q of the padded grid, output to every second pixel of the
// 2H x 2W image. Input gradient (dx = 1): the flipped taps over padded phase grids of
// dy, channel stride 4 grids; output the H x W image.
static ConvGeom upconv_geom(ConvGeom g, int p, int q, int dx) {
    ConvGeom u = g;
    u.T = 4;
    for (int a = 0; a < 2; a++)
        for (int b = 0; b < 2; b++)
            u.toff[a * 2 + b] = dx ? (1 + a - p) * g.Wp + 1 + b - q : (a + p) * g.Wp + b + q;
    if (dx) { u.S = 4 * g.P; return u; }
    u.out_pitch = 4 * g.W; u.out_step = 2; u.out_off = p * 2 * g.W + q; u.out_plane = (size_t)4 * g.H * g.W;
    return u;
}

// wc[phase][o][c][a b] from weight[o][c][i j].
static void upconv_combine(float* wc, const float* weight, int C_out, int C_in) {
    long n = (long)C_out * C_in;
    #pragma omp parallel for schedule(static) num_threads(kernel_threads)
    for (long oc = 0; oc < n; oc++)   // each 3x3 kernel read once, its 4 x 4 sums made in registers
        for (int ph = 0; ph < 4; ph++) {
            float sum[4] = {0};
            for (int i = 0; i < 3; i++)
                for (int j = 0; j < 3; j++) sum[up_tap(ph / 2, i) * 2 + up_tap(ph % 2, j)] += weight[oc * 9 + i * 3 + j];
            memcpy(wc + (ph * n + oc) * 4, sum, sizeof sum);
        }
}

// Scratch: the 17.2 layout of a stride-2 conv onto H x W (phase grids of the 2H x 2W
// gradient), then the combined weights (the forward reads them as they are: 4 phases
// of (C_out, C_in, 2 x 2)), and one phase's weight gradient (backward).
static size_t upsample_conv_workspace_floats_fast(int B, int C_in, int H, int W, int C_out, int threads) {
    return conv2d_workspace_floats_fast(B, C_in, 2 * H, 2 * W, C_out, 3, 2, threads) + (size_t)20 * C_out * C_in;
}

// inp (B, C_in, H, W) -> out (B, C_out, 2H, 2W).
static void upsample_conv_forward_fast(float* out, const float* inp, const float* weight, const float* bias,
                           int B, int C_in, int H, int W, int C_out, float* ws) {
    size_t total;
    ConvWork w = conv_work(ws, B, C_in, 2 * H, 2 * W, C_out, 3, 2, kernel_threads, &total);
    float* wc = ws + total;
    ConvGeom g = conv_geom(H, W, 3, 1);
    const float* x = conv_grids(w.planes, inp, B, C_in, g);
    upconv_combine(wc, weight, C_out, C_in);
    ConvGeom u[4];
    for (int ph = 0; ph < 4; ph++) u[ph] = upconv_geom(g, ph / 2, ph % 2, 0);
    conv_direct(out, x, wc, bias, B, C_in, C_out, u, 4);
}

static void upsample_conv_backward_fast(float* dinp, float* dweight, float* dbias, const float* dout,
                            const float* inp, const float* weight, int B, int C_in, int H, int W, int C_out,
                            float* ws) {
    size_t total, n = (size_t)C_out * C_in;
    ConvWork w = conv_work(ws, B, C_in, 2 * H, 2 * W, C_out, 3, 2, kernel_threads, &total);
    float *wc = ws + total, *dwc = wc + 16 * n;
    int CoP = round_up(C_out, CONV_DW_CO);
    ConvGeom g = conv_geom(H, W, 3, 1);
    conv_dbias(dbias, dout, B, C_out, (size_t)4 * H * W);
    const float* x = conv_grids(w.planes, inp, B, C_in, g);
    for (int ph = 0; ph < 4; ph++) {   // dwc = phase (p, q)'s 2x2 weight gradient, then onto the 3x3 taps
        int p = ph / 2, q = ph % 2;
        ConvGeom u = upconv_geom(g, p, q, 0);
        conv_transpose_dy(w.dyt, dout, B, C_out, CoP, u);
        memset(dwc, 0, 4 * n * sizeof(float));
        conv_dweight(dwc, w.dwacc, x, w.dyt, B, C_in, C_out, u);
        for (size_t oc = 0; oc < n; oc++)
            for (int i = 0; i < 3; i++)
                for (int j = 0; j < 3; j++) dweight[oc * 9 + i * 3 + j] += dwc[oc * 4 + up_tap(p, i) * 2 + up_tap(q, j)];
    }
    if (!dinp) return;
    ConvGeom phases = conv_geom(2 * H, 2 * W, 3, 2);   // dy's 4 phase grids per channel
    const float* d = conv_grids(w.planes, dout, B, C_out, phases);
    upconv_combine(wc, weight, C_out, C_in);
    for (int ph = 0; ph < 4; ph++) {
        conv_flip_weights(w.flipped, wc + (size_t)ph * n * 4, C_out, C_in, 4);
        ConvGeom u = upconv_geom(g, ph / 2, ph % 2, 1);
        conv_direct(dinp, d + ph * g.P, w.flipped, NULL, B, C_out, C_in, &u, 1);
    }
}

// sum_channel of 16.10, in lanes.
static void sum_channel_fast(float* dv, const float* dh, int B, int C, int HW) {
    #pragma omp parallel for schedule(static) if ((size_t)B * C * HW > 65536)
    for (int bc = 0; bc < B * C; bc++) dv[bc] = (float)lane_sum(dh + (size_t)bc * HW, HW);
}

#endif // DDPM_PLAIN: the end of Part III

// ============================================================================
// Part IV. Plumbing
// ============================================================================

// ----------------------------------------------------------------------------
// 18. Errors, memory, files, progress and signals
//
// Every failure a user can cause (a missing file, a bad flag, a full disk) ends in one
// line on stderr that names the file or flag and says what to do, and an exit code
// below 128: 1 for an error, 2 for a bad flag (section 22).

#include <setjmp.h>
#ifdef __linux__
#include <sys/auxv.h>
#endif
#ifdef DDPM_FUZZ
static jmp_buf fuzz_refused;   // tests/fuzz_ddpm.c: a refusal returns to the harness
#endif
#ifdef DDPM_MPI
#include <mpi.h>
#endif
// This process's rank and the number of ranks under MPI (section 23), else one process.
// A bad flag is every rank's, so rank 0 alone reports it; another error names its rank.
static int world_rank = 0, world_size = 1;

// Prints "ddpm: <message><suffix>" as one line, in one write (ranks' lines do not
// interleave), control bytes (a newline or ESC in a file's name) as \xNN: one line, no
// escape codes, whatever a path holds. to: the line goes there (cap bytes), not to stderr.
static void error_line_v(char* to, size_t cap, const char* suffix, const char* fmt, va_list ap) {
    char line[8192], msg[8192];
    int k = world_rank > 0 ? snprintf(line, sizeof line, "ddpm (rank %d): ", world_rank) : snprintf(line, sizeof line, "ddpm: ");
    vsnprintf(msg, sizeof msg, fmt, ap);
    for (const unsigned char* c = (const unsigned char*)msg; *c && k < (int)sizeof line - 64; c++)
        k += snprintf(line + k, 5, *c < 32 || *c == 127 ? "\\x%02x" : "%c", *c);
    snprintf(line + k, sizeof line - k, "%s\n", suffix);
    if (to) snprintf(to, cap, "%s", line);
    else fputs(line, stderr);
}

static void error_line(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    error_line_v(NULL, 0, "", fmt, ap);
    va_end(ap);
}

static void error_text(char* to, size_t cap, const char* fmt, ...) {   // the same line, kept to print later
    va_list ap;
    va_start(ap, fmt);
    error_line_v(to, cap, "", fmt, ap);
    va_end(ap);
}

// The same line, then exit with `code`. Built with DDPM_FUZZ (the fuzzing harnesses) a
// refusal returns to the harness instead, which then tries the next input.
_Noreturn static void fail_v(int code, const char* suffix, const char* fmt, va_list ap) {
#ifdef DDPM_FUZZ
    longjmp(fuzz_refused, 1);
#endif
    if (world_rank == 0 || code != 2) error_line_v(NULL, 0, suffix, fmt, ap);
#ifdef DDPM_MPI
    // Every rank ends here together, and only after rank 0 has written its line: a rank
    // that exited first would have mpirun kill rank 0 before the line was out.
    if (code == 2) MPI_Finalize();
#endif
    exit(code);
}

_Noreturn static void die(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fail_v(1, "", fmt, ap);
}

// What asks for less memory, in the command's own flags (main sets it).
static const char* memory_fix = "try a smaller --batch or --model";

static void* malloc_check(size_t size, const char* what) {
    void* p = malloc(size ? size : 1);
    if (!p) die("out of memory allocating %.1f MiB for %s; %s", size / 1048576.0, what, memory_fix);
    return p;
}

// Zeroed memory. A big buffer (the network's) is aligned to 2 MiB and, where Linux offers
// it, marked for transparent huge pages: a step sweeps hundreds of MiB, which with 4 KiB
// pages would keep missing the TLB.
static void* calloc_check(size_t n, size_t size, const char* what) {
    size_t bytes = (n ? n : 1) * (size ? size : 1), huge = (size_t)2 << 20;
    void* p;
    if (bytes >= 2 * huge) {
        size_t rounded = (bytes + huge - 1) / huge * huge;
        p = aligned_alloc(huge, rounded);
#ifdef MADV_HUGEPAGE
        if (p) madvise(p, rounded, MADV_HUGEPAGE);
#endif
        if (p) memset(p, 0, rounded);
    } else {
        p = calloc(n ? n : 1, size ? size : 1);
    }
    if (!p) die("out of memory allocating %.1f MiB for %s; %s", (double)n * size / 1048576.0, what, memory_fix);
    return p;
}

// Memory, before it is allocated. A network is built at full size once (section 15), so
// what it needs is known from its plan alone, and a run that cannot fit is refused in one
// line before any data is read, rather than killed by the out-of-memory killer hours later.
static double network_gib(const Config* c, int B, int train) {
    UNet p;
    unet_plan(&p, c, B);
    double floats = (double)p.L->n_acts + p.L->n_grad_acts + p.L->n_work + (train ? 5.0 : 2.0) * p.n_params;
    free(p.L);
    return floats * 4 / 1073741824.0;
}

// MemAvailable of /proc/meminfo in GiB, or -1 where it cannot be read (not Linux).
static double memory_available_gib(void) {
    FILE* f = fopen("/proc/meminfo", "r");
    if (!f) return -1;
    char line[256];
    double kb = -1;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "MemAvailable: %lf kB", &kb) == 1) break;
    fclose(f);
    return kb < 0 ? -1 : kb / 1048576.0;
}

// Sampling and evaluation go through the images in batches of at most `most`, and of
// at most 4 GiB of network: 64 images of a 32x32 network, 1 of paper256. The batch is a
// function of the network alone, never of the machine, so the same seed gives the same
// samples everywhere.
#define EVAL_BATCH_GIB 4.0
static int eval_batch(const Config* c, int n, int most) {
    int B = n < most ? n : most;
    double one = network_gib(c, 1, 0), per = B > 1 ? (network_gib(c, B, 0) - one) / (B - 1) : 0;   // two plans, not one per B
    while (B > 1 && one + (B - 1) * per > EVAL_BATCH_GIB) B--;
    return B;
}

// The one line of a network that does not fit, ending in what to do.
static void die_memory(const Config* c, int B, double need, double have, const char* fix) {
    die("%d image%s at once through the %dx%d network need%s about %.1f GiB of memory, and %.1f GiB is "
        "available; %s", B, B == 1 ? "" : "s", c->img, c->img, B == 1 ? "s" : "", need, have, fix);
}

// Dies if B images of the network (train: with gradients and Adam's state) need more
// memory than the machine has available.
static void check_memory(const Config* c, int B, int train, const char* fix) {
    double need = network_gib(c, B, train), have = memory_available_gib();
    if (have >= 0 && need > have) die_memory(c, B, need, have, fix);
}

// The OpenMP thread count, or 1 without OpenMP.
static int max_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

// Threads that give a busy core back. libgomp lets a thread that finished a parallel loop
// spin 300,000 times before it sleeps; beside another busy program those spinning threads
// hold up the one the scheduler took off its core. With GOMP_SPINCOUNT=1000 a step beside
// one busy process took about 2x its idle time (what losing one of two cores costs)
// rather than 3.4x, and idle no more than the noise (tests/README.md, Speed). libgomp
// reads it once, before main, so ddpm starts itself again with it unless a wait policy
// was given (not in the reference build: under gdb a restart only adds noise), and only
// where /proc/self/exe is this program: run by the loader (ld.so ./ddpm) or valgrind it is
// another, which would run instead.
static void threads_spin_briefly(char** argv) {
#if defined(_OPENMP) && !defined(DDPM_PLAIN) && defined(__linux__)
    struct stat self, named;
    const char* fn = (const char*)getauxval(AT_EXECFN);
    if (getenv("OMP_WAIT_POLICY") || getenv("GOMP_SPINCOUNT") || !fn || stat("/proc/self/exe", &self) ||
        stat(fn, &named) || self.st_dev != named.st_dev || self.st_ino != named.st_ino)
        return;
    if (setenv("GOMP_SPINCOUNT", "1000", 1) != 0) return;
    execv("/proc/self/exe", argv);   // returns only if it failed: go on as started
#else
    (void)argv;
#endif
}

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

static FILE* fopen_check(const char* path, const char* mode, const char* hint) {
    FILE* f = fopen(path, mode);
    if (!f) die("cannot open %s: %s%s%s", path, strerror(errno), hint ? "; " : "", hint ? hint : "");
    return f;
}

// Opens a file to read that must be a regular file: a FIFO would block forever (even in
// open, hence O_NONBLOCK until fstat has seen what it is) and a device never ends.
static FILE* fopen_regular(const char* path, const char* hint) {
    int fd = open(path, O_RDONLY | O_NONBLOCK);
    if (fd < 0) die("cannot open %s: %s%s%s", path, strerror(errno), hint ? "; " : "", hint ? hint : "");
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        die("%s is not a regular file (a FIFO, device or folder); pass the file itself", path);
    }
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
    FILE* f = fdopen(fd, "rb");
    if (!f) die("cannot open %s: %s", path, strerror(errno));
    return f;
}

// Reads exactly n bytes or dies naming the file: a short read means a truncated file.
static void fread_check(void* dst, size_t n, FILE* f, const char* path) {
    if (fread(dst, 1, n, f) != n)
        die("%s is truncated or unreadable (wanted %zu more bytes); re-create or re-download it",
            path, n);
}

static long file_size(const char* path) {
    struct stat st;
    return stat(path, &st) == 0 ? (long)st.st_size : -1;
}

static int all_finite(const float* x, size_t n) {
    for (size_t i = 0; i < n; i++) if (!isfinite(x[i])) return 0;
    return 1;
}

// Every file ddpm.c writes (checkpoints, pictures, arrays, tables, the repaired log)
// goes through here: it is written to PATH.tmp, flushed to disk and renamed over PATH,
// so a crash or a full disk never leaves a half file, and every failed write is
// reported. PATH.tmp is made anew with O_EXCL | O_NOFOLLOW: whatever stood there (a stale
// file, or a link planted to make us overwrite its target) is removed first, so the file
// is ours and never a link's target. PATH itself must be a regular file or absent.
typedef struct { FILE* f; char tmp[4200]; const char* path; } AtomicFile;

// Returns the stream to write, or NULL with a one-line reason in err.
static FILE* atomic_open(AtomicFile* a, const char* path, char* err, size_t errlen) {
    struct stat st;
    a->path = path;
    a->f = NULL;
    if (lstat(path, &st) == 0 && !S_ISREG(st.st_mode)) {
        snprintf(err, errlen, "%s exists and is not a regular file; not replacing it", path);
        return NULL;
    }
    snprintf(a->tmp, sizeof a->tmp, "%s.tmp", path);
    unlink(a->tmp);
    int fd = open(a->tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
    if (fd >= 0) a->f = fdopen(fd, "wb");
    if (!a->f) snprintf(err, errlen, "cannot create %s: %s", a->tmp, strerror(errno));
    return a->f;
}

// Finishes the file: if ok (every write succeeded) and it reaches the disk, PATH.tmp
// becomes PATH and 0 is returned; else PATH.tmp is removed, PATH is left as it was, and
// -1 is returned with a one-line reason in err.
static int atomic_commit(AtomicFile* a, int ok, char* err, size_t errlen) {
    int e = ok ? 0 : errno;
    if (ok && (fflush(a->f) != 0 || fsync(fileno(a->f)) != 0)) ok = 0, e = errno;
    if (fclose(a->f) != 0 && ok) ok = 0, e = errno;
    if (ok && rename(a->tmp, a->path) == 0) return 0;
    if (ok) e = errno;
    snprintf(err, errlen, "could not write %s: %s", a->path, strerror(e ? e : EIO));
    unlink(a->tmp);
    return -1;
}

// The whole of a file, a then b (nb may be 0). Returns 0, or -1 after one line on stderr.
static int write_file_atomic(const char* path, const void* a, size_t na, const void* b, size_t nb) {
    char err[4400];
    AtomicFile af;
    FILE* f = atomic_open(&af, path, err, sizeof err);
    if (f && atomic_commit(&af, fwrite(a, 1, na, f) == na && (nb == 0 || fwrite(b, 1, nb, f) == nb),
                           err, sizeof err) == 0)
        return 0;
    error_line("%s", err);
    return -1;
}

// FNV-1a, 64 bits: the checksum of checkpoints and caches, and the key of a cache.
typedef struct { uint64_t h; } Fnv;
#define FNV_START {0xcbf29ce484222325ULL}   // the offset basis: Fnv sum = FNV_START;

static void fnv_update(Fnv* f, const void* data, size_t n) {
    const uint8_t* p = data;
    uint64_t h = f->h;
    for (size_t i = 0; i < n; i++) { h ^= p[i]; h *= 0x100000001b3ULL; }
    f->h = h;
}

// n bytes to f, added to the checksum sum (may be NULL); 1 if written.
static int write_all(FILE* f, const void* p, size_t n, Fnv* sum) {
    if (sum) fnv_update(sum, p, n);
    return fwrite(p, 1, n, f) == n;
}

// Before any long work: PATH can be written. Its folder exists and is writable, PATH is
// not something other than a regular file (a device or a FIFO would be replaced), and it
// is not the file the command reads (input, may be NULL).
static void check_not_input(const char* path, const char* flag, const char* input);

static void check_output_path(const char* path, const char* flag, const char* input) {
    char dir[4200];
    snprintf(dir, sizeof dir, "%s", path);
    char* slash = strrchr(dir, '/');
    if (!slash) snprintf(dir, sizeof dir, ".");
    else if (slash == dir) slash[1] = 0;
    else *slash = 0;
    struct stat st;
    if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode)) die("%s %s: the folder %s does not exist; create it first", flag, path, dir);
    if (access(dir, W_OK) != 0) die("%s %s: the folder %s is not writable", flag, path, dir);
    if (lstat(path, &st) == 0 && !S_ISREG(st.st_mode))
        die("%s %s exists and is not a regular file; pass another path", flag, path);
    check_not_input(path, flag, input);
}

// 1 if a and b name one file (the same device and inode: a link is its target).
static int same_file(const char* a, const char* b) {
    struct stat sa, sb;
    return a && b && stat(a, &sa) == 0 && stat(b, &sb) == 0 && sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

// Before any long work: an output must not be the input the command reads (a checkpoint,
// an exchange file), which writing it would destroy.
static void check_not_input(const char* path, const char* flag, const char* input) {
    if (same_file(path, input))
        die("%s %s is the file this command reads (%s); pass another path", flag, path, input);
}

// A file of a run folder (its lock, its log), opened without following a link and
// refused if it has other names: a planted symbolic or hard link would otherwise make a
// run truncate or append to the file it points at.
static int open_run_file(const char* path, int flags) {
    int fd = open(path, flags | O_NOFOLLOW | O_CLOEXEC, 0644);
    if (fd < 0 && errno == ELOOP) die("%s is a symbolic link; a run folder's files must be its own: remove it", path);
    if (fd < 0) die("cannot open %s: %s; check that the run folder is writable", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_nlink > 1)
        die("%s is not a plain file of the run folder (a hard link or something else); remove it", path);
    return fd;
}

static void mkdir_p(const char* path) {
    char buf[4096];
    snprintf(buf, sizeof buf, "%s", path);
    for (char* p = buf + 1; *p; p++)
        if (*p == '/') { *p = 0; mkdir(buf, 0755); *p = '/'; }
    if (mkdir(buf, 0755) != 0 && errno != EEXIST) die("cannot create folder %s: %s", path, strerror(errno));
}

// Set by Ctrl-C / SIGTERM (and SIGHUP, SIGPIPE) to the signal's number: a long loop stops
// at its next step (a chain through its watcher, below; training in section 22) and the
// command saves what it has, or says it has nothing.
static volatile sig_atomic_t stop_requested = 0;

static void on_signal(int sig) { stop_requested = sig; }

static void install_signal_handlers(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);    // a closed terminal or ssh session
    sigaction(SIGPIPE, &sa, NULL);   // stderr into a pipe whose reader left (| head)
}

// "what done/total, time each, elapsed, ETA" on stderr: redrawn in place on a terminal,
// every tenth of the way in a log file. The time each is what a 256x256 chain needs
// (a second or more a step on a CPU).
static void progress_line(const char* what, long done, long total, double t0) {
    int saved = errno;   // isatty sets it: a failed write's reason, read after this line, must survive
    double el = now_seconds() - t0, eta = done > 0 ? el * (total - done) / done : 0, each = done > 0 ? el / done : 0;
    char e[32];
    if (each >= 0.1) snprintf(e, sizeof e, "%.2f s", each);
    else snprintf(e, sizeof e, "%.1f ms", 1e3 * each);
    if (isatty(2)) fprintf(stderr, "\r%s %ld/%ld  %s each, %.0fs elapsed, ETA %.0fs   ", what, done, total, e, el, eta);
    else if (done == total || done % (total / 10 > 0 ? total / 10 : 1) == 0)
        fprintf(stderr, "%s %ld/%ld  %s each, %.0fs elapsed, ETA %.0fs\n", what, done, total, e, el, eta);
    if (isatty(2) && done == total) fprintf(stderr, "\n");
    errno = saved;
}

// The watcher of a chain of section 10: a progress line, one count per step; a stop at
// Ctrl-C; with `finite`, a stop where the images leave the finite range (a broken network
// gives NaN: no NaN picture is written as if it were one), noting the step in t_bad; and
// the record of Fig. 6 if trace is set. progress_start points pg->watch at pg.
typedef struct {
    const char* what;
    long done, total;
    double t0;
    int finite, t_bad;   // t_bad: the step (1..T) where x_t stopped being finite; 0 while it is
    Trace* trace;
    Watch watch;
} Progress;

static int progress_step(void* ctx, const ChainStep* st) {
    Progress* p = ctx;
    progress_line(p->what, ++p->done, p->total, p->t0);
    int go = !stop_requested;
    if (p->finite && !all_finite(st->x_t, (size_t)st->B * st->n)) p->t_bad = st->t, go = 0;
    if (p->trace) trace_record(p->trace, st);
    return go;
}

static const Watch* progress_start(Progress* p, const char* what, long total, int finite, Trace* trace) {
    *p = (Progress){what, 0, total, now_seconds(), finite, 0, trace, {progress_step, p}};
    return &p->watch;
}

// A mapped cache (section 19.1) cut short by another process gives SIGBUS at the next read
// of a lost page. A training run catches it (cache_fault: back to cmd_train, which saves its
// checkpoint); elsewhere it ends in one line naming the file.
static struct { const uint8_t* at; size_t len; char path[4400], line[8192]; } cache_map;
static sigjmp_buf* cache_fault;

static void on_bus(int sig, siginfo_t* si, void* uc) {
    (void)uc;
    const uint8_t* a = si->si_addr;
    if (a < cache_map.at || a >= cache_map.at + cache_map.len) { signal(sig, SIG_DFL); return; }   // not ours
    if (cache_fault) siglongjmp(*cache_fault, 1);
    ssize_t w = write(2, cache_map.line, strlen(cache_map.line));
    (void)w;
    _exit(1);
}

// ----------------------------------------------------------------------------
// 19. Datasets on disk
//
//   CIFAR-10, binary version: data/cifar-10-batches-bin/data_batch_{1..5}.bin (train)
//     and test_batch.bin; each record is 3073 bytes: a label, then 1024 R, 1024 G,
//     1024 B bytes of a 32x32 image (already NCHW).
//   Fashion-MNIST: data/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte, the
//     IDX format (big-endian magic 0x803 / 0x801, then the dimensions). 28x28 images are
//     padded to 32x32 with the background value 0, so the same U-Net fits both.

#define CIFAR_RECORD 3073

static void load_cifar10(Dataset* d, const char* dir, int train) {
    const char* files_train[] = {"data_batch_1.bin", "data_batch_2.bin", "data_batch_3.bin", "data_batch_4.bin", "data_batch_5.bin"};
    const char* files_test[] = {"test_batch.bin"};
    const char** files = train ? files_train : files_test;
    int n_files = train ? 5 : 1;
    char path[4096];
    long counts[5], total = 0;
    for (int i = 0; i < n_files; i++) {
        snprintf(path, sizeof path, "%s/cifar-10-batches-bin/%s", dir, files[i]);
        long size = file_size(path);
        if (size < 0) die("%s not found; run `make cifar10` to download CIFAR-10, or use --data fashion-mnist offline", path);
        if (size == 0 || size % CIFAR_RECORD)
            die("%s has %ld bytes, not a whole number of %d-byte CIFAR-10 records; delete it and run `make cifar10` again",
                path, size, CIFAR_RECORD);
        counts[i] = size / CIFAR_RECORD;
        total += counts[i];
    }
    snprintf(d->name, sizeof d->name, "cifar10");
    d->N = (int)total; d->C = 3; d->H = d->W = 32;
    d->pixels = malloc_check((size_t)total * 3072, "CIFAR-10 images");
    d->labels = malloc_check((size_t)total, "CIFAR-10 labels");
    uint8_t rec[CIFAR_RECORD];
    long n = 0;
    for (int i = 0; i < n_files; i++) {
        snprintf(path, sizeof path, "%s/cifar-10-batches-bin/%s", dir, files[i]);
        FILE* f = fopen_regular(path, "run `make cifar10`");
        for (long r = 0; r < counts[i]; r++, n++) {
            fread_check(rec, CIFAR_RECORD, f, path);
            if (rec[0] > 9) die("%s: record %ld has label %d, not 0..9; this is not a CIFAR-10 binary file (run `make cifar10`)", path, r, rec[0]);
            d->labels[n] = rec[0];
            memcpy(d->pixels + (size_t)n * 3072, rec + 1, 3072);
        }
        fclose(f);
    }
}

static uint32_t read_be32(FILE* f, const char* path) {
    uint8_t b[4];
    fread_check(b, 4, f, path);
    return (uint32_t)b[0] << 24 | (uint32_t)b[1] << 16 | (uint32_t)b[2] << 8 | b[3];
}

// Opens an IDX file, checks its magic and dimensions, returns it positioned at the data.
static FILE* idx_open(const char* path, uint32_t magic, int ndim, uint32_t* dims) {
    long size = file_size(path);
    if (size < 0) die("%s not found; run `make fashion-mnist` (needs Debian's dataset-fashion-mnist)", path);
    FILE* f = fopen_regular(path, "run `make fashion-mnist`");
    uint32_t m = read_be32(f, path);
    if (m != magic) die("%s: bad IDX magic 0x%08x (want 0x%08x); is it gzipped? run `make fashion-mnist`", path, m, magic);
    long need = 4 + 4L * ndim, count = 1;
    for (int i = 0; i < ndim; i++) {   // stop as soon as the product exceeds the file: no overflow
        dims[i] = read_be32(f, path);
        count = dims[i] && count > size / (long)dims[i] ? size + 1 : count * (long)dims[i];
    }
    if (size != need + count)
        die("%s has %ld bytes, the header promises %ld; the file is truncated or corrupt (run `make fashion-mnist`)",
            path, size, need + count);
    return f;
}

static void load_fashion_mnist(Dataset* d, const char* dir, int train) {
    char ipath[4096], lpath[4096];
    const char* split = train ? "train" : "t10k";
    snprintf(ipath, sizeof ipath, "%s/fashion-mnist/%s-images-idx3-ubyte", dir, split);
    snprintf(lpath, sizeof lpath, "%s/fashion-mnist/%s-labels-idx1-ubyte", dir, split);
    uint32_t idims[3], ldims[1];
    FILE* fi = idx_open(ipath, 0x803, 3, idims);
    FILE* fl = idx_open(lpath, 0x801, 1, ldims);
    if (idims[1] != 28 || idims[2] != 28) die("%s: images are %ux%u, expected 28x28", ipath, idims[1], idims[2]);
    if (idims[0] == 0) die("%s holds no images; the file is corrupt (run `make fashion-mnist`)", ipath);
    if (idims[0] != ldims[0]) die("%s has %u images but %s has %u labels", ipath, idims[0], lpath, ldims[0]);
    snprintf(d->name, sizeof d->name, "fashion-mnist");
    d->N = (int)idims[0]; d->C = 1; d->H = d->W = 32;
    d->pixels = calloc_check((size_t)d->N, 1024, "Fashion-MNIST images");   // zero = background
    d->labels = malloc_check((size_t)d->N, "Fashion-MNIST labels");
    uint8_t img[784];
    for (int n = 0; n < d->N; n++) {
        fread_check(img, 784, fi, ipath);
        for (int y = 0; y < 28; y++) memcpy(d->pixels + (size_t)n * 1024 + (y + 2) * 32 + 2, img + y * 28, 28);
    }
    fread_check(d->labels, d->N, fl, lpath);
    for (int n = 0; n < d->N; n++)
        if (d->labels[n] > 9) die("%s: label %d of image %d is not 0..9; the file is corrupt (run `make fashion-mnist`)", lpath, d->labels[n], n);
    fclose(fi); fclose(fl);
}

// ---- 19.1 A folder of pictures, like §4's CelebA-HQ and LSUN at 256x256 (--data DIR) ----
//
// Any folder of pictures, searched recursively: whatever stb_image reads, by extension in
// any case, hidden files and folders skipped, in sorted path order (one seed, one run on
// any file system); a folder reached again through a symbolic link (a loop) is refused.
// Every picture is
//   1. composited over a grey background (--background, white by default) if it has
//      alpha: dropping alpha would show whatever the transparent pixels happen to hold;
//   2. made grey (ITU-R 601 luma, as PIL's convert("L")) or RGB, to the network's
//      channels: 1 if every picture of the folder is grey, else 3, unless --in-ch says;
//   3. cropped to its centre square (the official LSUN pipeline's choice), then
//   4. resized to N x N with Catmull-Rom (PIL's BICUBIC), widened by the scale when
//      shrinking so that it antialiases (stb_image_resize v0.97 has no Lanczos, the
//      official filter). tests/test_folder.py checks the pixels against PIL. A picture
//      smaller than N is enlarged for training (and counted), refused for evaluation.
// The first run decodes the folder into one cache file of uint8 (N, C, H, W) pixels,
// written atomically (section 18); later runs map it (mmap), so a dataset larger than
// memory trains, and training drops the pages it read after every step (dataset_forget).
// Its key is the file list with each file's size and modification time, N, the channels,
// the background and --skip-bad; a change rebuilds it, and so does a damaged one.

#define STB_IMAGE_IMPLEMENTATION
#define STBI_MAX_DIMENSIONS INT_MAX   // every side is read; MAX_PICTURE_PIXELS refuses, before any allocation
// stb_image's asserts are its "cannot happen"s, and a corrupt JPEG scan makes one happen
// (stb 2.27; found by tests/fuzz_pictures): noted, so that the picture is refused, not the
// program aborted.
static _Thread_local int stb_inconsistent;
#define STBI_ASSERT(x) (stb_inconsistent |= !(x))
#define STB_IMAGE_RESIZE_IMPLEMENTATION
#define STB_IMAGE_RESIZE_STATIC
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#pragma GCC diagnostic ignored "-Wsign-compare"
#pragma GCC diagnostic ignored "-Wunused-parameter"
#pragma GCC diagnostic ignored "-Wunused-but-set-variable"
#pragma GCC diagnostic ignored "-Wimplicit-fallthrough"
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#endif
#include "stb_image.h"
#include "stb_image_resize.h"
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif
#include <dirent.h>

typedef struct {
    const char* dir;         // the folder
    const char* cache_dir;   // where its decoded cache lives
    int img;                 // the side N of the square pictures
    int in_ch;               // 1, 3, or 0: 1 if every picture is grey, else 3
    int background;          // the grey level alpha is composited over, 0..255
    int skip_bad;            // skip unreadable pictures (counted) rather than refuse them
    int enlarge;             // 1: enlarge pictures smaller than N (training); 0: refuse them
    int at_least;            // refuse a folder with fewer pictures (the batch), before writing
} FolderSpec;

#define MAX_PICTURE_PIXELS (1L << 26)   // 64 megapixels: a bigger file is refused as bad
// Larger pictures decode one at a time (the others in parallel): stb's buffers and ours then
// stay under about 1.5 GB for the largest (64 megapixels, 16-bit RGBA) plus 100 MB a thread.
#define BIG_PICTURE_PIXELS (1L << 22)

typedef struct { dev_t dev; ino_t ino; } FileId;
// The pictures found, and the folders read (seen): a folder reached again through a
// symbolic link is read once (`again` counts them), else its pictures would weigh double.
typedef struct { char** path; long n, cap; FileId* seen; long n_seen, again; } PathList;

static int picture_extension(const char* name) {
    static const char* const EXT[] = {"png", "jpg", "jpeg", "jpe", "bmp", "gif", "tga", "pnm", "ppm", "pgm",
                                      "psd", "hdr", "pic", NULL};
    const char* dot = strrchr(name, '.');
    if (!dot) return 0;
    for (int i = 0; EXT[i]; i++)
        if (!strcasecmp(dot + 1, EXT[i])) return 1;
    return 0;
}

static void pathlist_add(PathList* l, const char* path) {
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 1024;
        char** p = realloc(l->path, l->cap * sizeof *p);
        if (!p) die("out of memory listing the pictures of a folder");
        l->path = p;
    }
    l->path[l->n] = strdup(path);
    if (!l->path[l->n++]) die("out of memory listing the pictures of a folder");
}

// The pictures under dir (by name: whether each decodes is found out later). `up` holds
// the folders above, to see a loop through a symbolic link (refused: a mistake, surely).
typedef struct Above { dev_t dev; ino_t ino; const struct Above* up; } Above;

static void folder_scan(PathList* l, const char* dir, const Above* up, int depth, long* ignored) {
    struct stat st;
    if (stat(dir, &st) != 0) die("--data %s: %s", dir, strerror(errno));
    for (const Above* a = up; a; a = a->up)
        if (a->dev == st.st_dev && a->ino == st.st_ino)
            die("--data: %s leads back to a folder above it (a symbolic link loop); remove the link", dir);
    if (depth > 64) die("--data: %s is nested more than 64 folders deep", dir);
    for (long i = 0; i < l->n_seen; i++)
        if (l->seen[i].dev == st.st_dev && l->seen[i].ino == st.st_ino) { l->again++; return; }
    if (!(l->n_seen & (l->n_seen - 1)) && !(l->seen = realloc(l->seen, 2 * (l->n_seen + 1) * sizeof *l->seen)))
        die("out of memory listing the folders of %s", dir);
    l->seen[l->n_seen++] = (FileId){st.st_dev, st.st_ino};
    Above here = {st.st_dev, st.st_ino, up};
    struct dirent** e;   // in sorted order: which path reaches a folder first is the same on any file system
    int n = scandir(dir, &e, NULL, alphasort);
    if (n < 0) die("--data: cannot read the folder %s: %s", dir, strerror(errno));
    char path[4096];
    for (int i = 0; i < n; free(e[i++])) {
        if (e[i]->d_name[0] == '.') continue;   // hidden files and folders, and . and ..
        if (snprintf(path, sizeof path, "%s/%s", dir, e[i]->d_name) >= (int)sizeof path)
            die("--data: a path under %s is longer than %zu bytes", dir, sizeof path);
        int is_dir = stat(path, &st) == 0 && S_ISDIR(st.st_mode);
        if (is_dir) folder_scan(l, path, &here, depth + 1, ignored);
        else if (picture_extension(e[i]->d_name)) pathlist_add(l, path);   // a broken link too: a bad picture
        else ++*ignored;
    }
    free(e);
}

static int compare_paths(const void* a, const void* b) { return strcmp(*(char* const*)a, *(char* const*)b); }

// Opens a picture that must be a regular file (a FIFO named x.png would block stb_image).
static FILE* picture_open(const char* path, const char** why) {
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    struct stat st;
    if (fd < 0) { *why = strerror(errno); return NULL; }
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) { close(fd); *why = "not a regular file"; return NULL; }
    if (st.st_size == 0) { close(fd); *why = "an empty file"; return NULL; }
    FILE* f = fdopen(fd, "rb");
    if (!f) { close(fd); *why = strerror(errno); }
    return f;
}

// stb_image reads a short BMP, GIF, PNM, TGA, PSD, HDR or PIC file as if it went on in
// zeros. So pictures are read through these callbacks, which note a read past the end: a
// file cut short is refused, in every format. (Before a picture is decoded, stb probes the
// formats with at most 4 bytes each, TGA's last with 18: only a file that short is read
// past its end in a probe, and it is no picture anyway.)
typedef struct { FILE* f; int past_end; } PictureFile;
static int picture_read(void* u, char* buf, int n) {
    PictureFile* p = u;
    size_t k = fread(buf, 1, n, p->f);
    p->past_end |= k < (size_t)n && (k == 0 || n != 128);   // 128: stb's buffer refill, which may end short
    return (int)k;
}
static void picture_skip(void* u, int n) {   // as stb's own: a seek past the end leaves feof set
    FILE* f = ((PictureFile*)u)->f;
    int c = fseek(f, n, SEEK_CUR) == 0 ? getc(f) : EOF;
    if (c != EOF) ungetc(c, f);
}
static int picture_eof(void* u) { return feof(((PictureFile*)u)->f) || ferror(((PictureFile*)u)->f); }
static const stbi_io_callbacks PICTURE_IO = {picture_read, picture_skip, picture_eof};

// stb_image 2.27 (Debian bookworm's) builds a JPEG's Huffman tables from counts it does not
// check: counts summing past 256 codes write past its tables (found by tests/fuzz_pictures).
// So every DHT segment is checked first, between the scans too (a scan's bytes are skipped:
// 0xff there is followed by 0, a restart marker, or the next marker). stb takes any file
// that starts with 0xff (then fill bytes, then SOI) for a JPEG.
static int jpeg_tables_ok(FILE* f) {
    for (int c = getc(f), m; c != EOF; c = getc(f)) {
        if (c != 0xff || (m = getc(f)) == 0xff) { if (c == 0xff) ungetc(m, f); continue; }
        if (m == EOF || m == 0 || m == 1 || (m >= 0xd0 && m <= 0xd9)) continue;   // no segment follows
        int hi = getc(f), lo = getc(f);
        if (hi < 0 || lo < 0) return 1;
        int len = (hi << 8 | lo) - 2;
        for (uint8_t t[17]; m == 0xc4 && len > 0; len -= 17) {   // its tables, read as stb does: zeros past the end
            size_t got = fread(memset(t, 0, 17), 1, 17, f);
            int n = 0;
            for (int i = 1; i < 17; i++) n += t[i];
            if (n > 256) return 0;
            if (got < 17 || fseek(f, n, SEEK_CUR) != 0) return 1;
            len -= n;
        }
        if (len < 0 || fseek(f, len, SEEK_CUR) != 0) return 1;   // what stb will refuse itself
    }
    return 1;
}

// It also reads a PNM header's three numbers into an int without a bound (a signed
// overflow): a number of more than 9 digits is refused first.
static int pnm_numbers_ok(FILE* f) {
    int c = (getc(f), getc(f), getc(f));   // past "P5" or "P6"
    for (int k = 0; k < 3; k++) {
        for (;;) {   // whitespace and # comments, skipped as stb skips them
            while (c == ' ' || (c >= '\t' && c <= '\r')) c = getc(f);
            if (c != '#') break;
            while (c != EOF && c != '\n' && c != '\r') c = getc(f);
        }
        for (int digits = 0; c >= '0' && c <= '9'; c = getc(f))
            if (++digits > 9) return 0;
    }
    return 1;
}

// Opens the picture, reads its header: its size and channels (1 grey, 2 grey + alpha, 3 RGB,
// 4 RGBA), or NULL with *why set. stb allocates a picture at the size its header declares,
// before it reads a pixel, so a header alone could cost a gigabyte: the header must fit
// the file's size. A JPEG codes at least one bit per 8x8 block of its widest component
// (subsampled at most 4 times), so at most 2,048 pixels a byte; deflate (PNG), LZW (GIF)
// and PIC's runs less than 32,768; the run lengths of TGA, PSD and HDR less than 64, and
// BMP and PNM store every pixel.
static FILE* picture_header(const char* path, PictureFile* pf, int* w, int* h, int* comp, const char** why) {
    FILE* f = picture_open(path, why);
    if (!f) return NULL;
    *pf = (PictureFile){f, 0};
    unsigned char m[4] = {0};
    long size = fread(m, 1, 4, f) == 4 && fseek(f, 0, SEEK_END) == 0 ? ftell(f) : 0;
    rewind(f);
    long most = m[0] == 0xff ? 2048 : !memcmp(m, "\x89PNG", 4) || !memcmp(m, "GIF8", 4) ||
                !memcmp(m, "\x53\x80\xf6\x34", 4) ? 32768 : 64;
    if (most == 2048 ? !jpeg_tables_ok(f) : m[0] == 'P' && (m[1] == '5' || m[1] == '6') && !pnm_numbers_ok(f)) {
        fclose(f);
        *why = "damaged (a header that stb_image would misread)";
        return NULL;
    }
    rewind(f);
    if (!stbi_info_from_callbacks(&PICTURE_IO, pf, w, h, comp)) {
        stbi__context s;   // stb tries each format and keeps the last one's reason: ask PNG and JPEG again
        rewind(f), stbi__start_callbacks(&s, (stbi_io_callbacks*)&PICTURE_IO, pf);
        if (m[0] == 0x89) stbi__png_info(&s, w, h, comp);
        if (m[0] == 0xff) stbi__jpeg_info(&s, w, h, comp);
        *why = pf->past_end ? "cut short" : stbi_failure_reason();
    } else if ((double)*w * *h > MAX_PICTURE_PIXELS) {
        *why = "too large (more than 64 megapixels)";
    } else if (*w < 1 || *h < 1 || (double)*w * *h > (double)most * size) {
        *why = "cut short or damaged (its header promises more pixels than its size holds)";
    } else {
        rewind(f);
        return f;
    }
    fclose(f);
    return NULL;
}

static int picture_channels(const char* path, const char** why) {
    PictureFile pf;
    int w, h, comp;
    FILE* f = picture_header(path, &pf, &w, &h, &comp, why);
    if (!f) return 0;
    fclose(f);
    return comp;
}

// Steps 1-4 above: the pixels of an opened picture to out (C, N, N), or a reason they
// cannot be. *small is set if it had to be enlarged.
static const char* picture_pixels(PictureFile* pf, const FolderSpec* fs, int C, uint8_t* out, int* small) {
    int w, h, comp;
    stb_inconsistent = 0;
    uint8_t* p = stbi_load_from_callbacks(&PICTURE_IO, pf, &w, &h, &comp, 0);
    if (p && (pf->past_end || stb_inconsistent)) stbi_image_free(p), p = NULL;
    if (!p) return pf->past_end ? "cut short (the file ends before its pixels do)"
                  : stb_inconsistent ? "damaged (stb_image found its data inconsistent)" : stbi_failure_reason();
    int N = fs->img, s = w < h ? w : h, x0 = (w - s) / 2, y0 = (h - s) / 2, bg = fs->background;
    uint8_t* sq = malloc((size_t)s * s * C);
    uint8_t* res = malloc((size_t)N * N * C);
    if (!sq || !res) { free(sq); free(res); stbi_image_free(p); return "out of memory"; }
    for (int y = 0; y < s; y++)
        for (int x = 0; x < s; x++) {
            const uint8_t* px = p + ((size_t)(y + y0) * w + x + x0) * comp;
            int grey = comp < 3, a = comp == 2 || comp == 4 ? px[comp - 1] : 255, rgb[3];
            for (int c = 0; c < 3; c++) {   // step 1: over the background
                int v = px[grey ? 0 : c];
                rgb[c] = (v * a + bg * (255 - a) + 127) / 255;
            }
            uint8_t* q = sq + ((size_t)y * s + x) * C;   // step 2
            if (C == 1) q[0] = grey ? rgb[0] : (rgb[0] * 19595 + rgb[1] * 38470 + rgb[2] * 7471 + 0x8000) >> 16;
            else for (int c = 0; c < 3; c++) q[c] = rgb[c];
        }
    stbi_image_free(p);
    *small = s < N;
    if (*small && !fs->enlarge) { free(sq); free(res); return "smaller than the network's side"; }
    int ok = stbir_resize_uint8_generic(sq, s, s, s * C, res, N, N, N * C, C, STBIR_ALPHA_CHANNEL_NONE, 0,
                                        STBIR_EDGE_CLAMP, STBIR_FILTER_CATMULLROM, STBIR_COLORSPACE_LINEAR, NULL);
    for (int c = 0; c < C; c++)   // interleaved -> planar (NCHW)
        for (int i = 0; i < N * N; i++) out[(size_t)c * N * N + i] = res[(size_t)i * C + c];
    free(sq); free(res);
    return ok ? NULL : "cannot be resized";
}

// One picture to out (C, N, N), or a reason it cannot be; a big one decodes alone.
static const char* picture_decode(const char* path, const FolderSpec* fs, int C, uint8_t* out, int* small) {
    const char* why = NULL;
    PictureFile pf;
    int w, h, comp;
    FILE* f = picture_header(path, &pf, &w, &h, &comp, &why);
    if (!f) return why;
    if ((long)w * h > BIG_PICTURE_PIXELS) {
        #pragma omp critical(big_picture)
        why = picture_pixels(&pf, fs, C, out, small);
    } else {
        why = picture_pixels(&pf, fs, C, out, small);
    }
    fclose(f);
    return why;
}

// The cache file: this header, padded to 4096 bytes so that the pixels are page-aligned
// for mmap, then the pixels, uint8 (n, c, side, side).
#define PIXEL_CACHE_MAGIC "DDPMPIX1"
#define PIXEL_CACHE_DATA 4096
typedef struct {
    char magic[8];
    uint64_t key;             // the folder's file list and the settings (folder_key)
    int32_t n, c, side;
    int32_t skipped, enlarged;
    int32_t pad;
    uint64_t pixels_sum;      // FNV-1a of the pixels
    uint64_t header_sum;      // FNV-1a of the bytes above
} PixelCacheHeader;
_Static_assert(sizeof(PixelCacheHeader) == 56, "the cache header is 56 bytes (tests/test_folder.py reads it)");

static uint64_t folder_key(const PathList* l, const FolderSpec* fs) {
    Fnv h = FNV_START;
    size_t skip = strlen(fs->dir);
    for (long i = 0; i < l->n; i++) {
        struct stat st;
        int64_t facts[3] = {-1, -1, -1};
        if (stat(l->path[i], &st) == 0) facts[0] = st.st_size, facts[1] = st.st_mtim.tv_sec, facts[2] = st.st_mtim.tv_nsec;
        fnv_update(&h, l->path[i] + skip, strlen(l->path[i] + skip) + 1);   // the path inside the folder
        fnv_update(&h, facts, sizeof facts);
    }
    int32_t settings[5] = {1 /* this way of decoding */, fs->img, fs->in_ch, fs->background, fs->skip_bad};
    fnv_update(&h, settings, sizeof settings);
    return h.h;
}

static uint64_t pixel_cache_header_sum(const PixelCacheHeader* hd) {
    Fnv h = FNV_START;
    fnv_update(&h, hd, offsetof(PixelCacheHeader, header_sum));
    return h.h;
}

// Maps the cache at path if it holds what key describes; else returns 0 (saying why, if
// it was there but not right). verify: also check the pixels' checksum (not for a cache
// this process has just written and summed).
static int pixel_cache_map(Dataset* d, const char* path, uint64_t key, const FolderSpec* fs, int verify) {
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) return 0;
    struct stat st;
    PixelCacheHeader hd;
    const char* bad = NULL;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) bad = "not a regular file";
    else if (pread(fd, &hd, sizeof hd, 0) != (ssize_t)sizeof hd || memcmp(hd.magic, PIXEL_CACHE_MAGIC, 8) ||
             hd.header_sum != pixel_cache_header_sum(&hd))
        bad = "its header is damaged";
    else if (hd.key != key) bad = "the folder or the settings changed";
    else if (hd.n <= 0 || (hd.c != 1 && hd.c != 3) || hd.side < 1 || hd.side > 256 || hd.side != fs->img ||
             (fs->in_ch && hd.c != fs->in_ch) ||
             st.st_size != PIXEL_CACHE_DATA + (off_t)hd.n * hd.c * hd.side * hd.side)
        bad = "its size does not match its header";
    if (!bad && verify) {   // the pixels' checksum, read in chunks (a read, not the map: RSS stays small)
        Fnv h = FNV_START;
        size_t chunk = (size_t)1 << 24;
        uint8_t* buf = malloc_check(chunk, "reading the picture cache");
        for (off_t at = PIXEL_CACHE_DATA; at < st.st_size && !bad;) {
            ssize_t k = pread(fd, buf, chunk, at);
            if (k <= 0) bad = "it cannot be read";
            else fnv_update(&h, buf, k), at += k;
        }
        free(buf);
        if (!bad && h.h != hd.pixels_sum) bad = "its pixels do not match their checksum";
    }
    if (bad) {
        fprintf(stderr, "%s: %s; decoding the folder again\n", path, bad);
        close(fd);
        return 0;
    }
    void* map = mmap(NULL, st.st_size, PROT_READ, MAP_SHARED, fd, 0);
    close(fd);
    if (map == MAP_FAILED) die("cannot map %s: %s", path, strerror(errno));
    cache_map.at = map, cache_map.len = st.st_size;   // section 18: SIGBUS if it is cut short
    snprintf(cache_map.path, sizeof cache_map.path, "%s", path);
    error_text(cache_map.line, sizeof cache_map.line, "%s was cut short while this command read it (another process "
               "truncated it); run the command again to decode the folder anew", path);
    struct sigaction sa = {.sa_sigaction = on_bus, .sa_flags = SA_SIGINFO};
    sigaction(SIGBUS, &sa, NULL);
#ifdef MADV_RANDOM
    madvise(map, st.st_size, MADV_RANDOM);   // batches are drawn at random: no read-ahead
#endif
    d->N = hd.n; d->C = hd.c; d->H = d->W = hd.side;
    d->pixels = (uint8_t*)map + PIXEL_CACHE_DATA;
    d->mapped = st.st_size;
    if (hd.skipped) fprintf(stderr, "%s: %d unreadable pictures skipped (--skip-bad)\n", fs->dir, hd.skipped);
    if (hd.enlarged && !fs->enlarge)
        die("--data %s: %d of its pictures are smaller than %dx%d, the network's side; evaluate on pictures at least "
            "%d pixels on their short side", fs->dir, hd.enlarged, hd.side, hd.side, hd.side);
    if (hd.enlarged) fprintf(stderr, "warning: %d pictures of %s are smaller than %dx%d and were enlarged\n",
                             hd.enlarged, fs->dir, hd.side, hd.side);
    return 1;
}

// Decodes the pictures into the cache at path, in chunks (the memory stays that of one
// chunk, whatever the folder's size, plus stb's buffers: BIG_PICTURE_PIXELS), in parallel
// within a chunk.
static void pixel_cache_build(const PathList* l, const FolderSpec* fs, uint64_t key, const char* path) {
    int C = fs->in_ch;
    if (!C) {   // 1 if every picture is grey (with or without alpha), else 3
        C = 1;
        for (long i = 0; i < l->n && C == 1; i++) {
            const char* why = NULL;
            int comp = picture_channels(l->path[i], &why);
            if (!comp && !fs->skip_bad)
                die("%s: %s; remove it, or pass --skip-bad to skip such files", l->path[i], why);
            if (comp >= 3) C = 3;
        }
    }
    size_t one = (size_t)C * fs->img * fs->img;
    long chunk = (long)((64 << 20) / one);
    if (chunk < 64) chunk = 64;
    uint8_t* buf = malloc_check(chunk * one, "decoding pictures");
    const char** why = malloc_check(chunk * sizeof *why, "decoding pictures");
    int* small = malloc_check(chunk * sizeof *small, "decoding pictures");
    char err[4400];
    AtomicFile af;
    FILE* f = atomic_open(&af, path, err, sizeof err);
    if (!f) die("%s; check that --data-dir is writable", err);
    PixelCacheHeader hd;
    memset(&hd, 0, sizeof hd);
    memcpy(hd.magic, PIXEL_CACHE_MAGIC, 8);
    hd.key = key; hd.c = C; hd.side = fs->img;
    Fnv sum = FNV_START;
    int ok = fseek(f, PIXEL_CACHE_DATA, SEEK_SET) == 0;
    double t0 = now_seconds();
    char what[4200];
    snprintf(what, sizeof what, "decoding %s:", fs->dir);
    for (long at = 0; at < l->n && ok; at += chunk) {
        long k = l->n - at < chunk ? l->n - at : chunk;
        #pragma omp parallel for schedule(dynamic, 4)
        for (long i = 0; i < k; i++) why[i] = picture_decode(l->path[at + i], fs, C, buf + i * one, &small[i]);
        for (long i = 0; i < k && ok; i++) {
            if (why[i] && !fs->skip_bad) {
                fclose(f), unlink(af.tmp);
                die("%s: %s; remove it, or pass --skip-bad to skip such files", l->path[at + i], why[i]);
            }
            if (why[i]) { hd.skipped++; continue; }
            hd.enlarged += small[i];
            hd.n++;
            ok = write_all(f, buf + i * one, one, &sum);
        }
        progress_line(what, at + k, l->n, t0);
    }
    hd.pixels_sum = sum.h;
    hd.header_sum = pixel_cache_header_sum(&hd);
    if (ok && hd.n < fs->at_least) {
        fclose(f), unlink(af.tmp);
        die("--data %s holds %d readable pictures, fewer than %d%s", fs->dir, hd.n, fs->at_least,
            fs->at_least > 1 ? " (--batch); add pictures or pass a smaller --batch" : "");
    }
    ok = ok && fseek(f, 0, SEEK_SET) == 0 && fwrite(&hd, sizeof hd, 1, f) == 1;
    if (atomic_commit(&af, ok, err, sizeof err) != 0) die("%s; check the free space of --data-dir", err);
    fprintf(stderr, "decoded %d pictures of %s in %.1f s into %s (%.1f MiB)\n", hd.n, fs->dir, now_seconds() - t0,
            path, (PIXEL_CACHE_DATA + (double)hd.n * one) / 1048576);
    free(buf); free(why); free(small);
}

static void folder_load(Dataset* d, const FolderSpec* fs) {
    memset(d, 0, sizeof *d);
    PathList l = {0};
    long ignored = 0;
    folder_scan(&l, fs->dir, NULL, 0, &ignored);
    if (l.again) fprintf(stderr, "%s: %ld folders reached again through symbolic links are read once\n", fs->dir, l.again);
    if (l.n == 0) die("--data %s holds no pictures (PNG, JPEG, BMP, GIF, TGA, PNM, PSD, HDR, PIC)", fs->dir);
    if (l.n > INT_MAX / 2) die("--data %s holds %ld pictures, more than ddpm.c counts", fs->dir, l.n);
    qsort(l.path, l.n, sizeof *l.path, compare_paths);
    // The cache's name: the folder's name, a hash of its full path, the settings.
    char real[PATH_MAX], name[4400], path[4600];
    if (!realpath(fs->dir, real)) snprintf(real, sizeof real, "%s", fs->dir);
    Fnv where = FNV_START;
    fnv_update(&where, real, strlen(real));
    const char* base = strrchr(real, '/');
    base = base && base[1] ? base + 1 : "root";
    snprintf(name, sizeof name, "%.64s-%08x-%dpx-%s-bg%d%s", base, (unsigned)(where.h >> 32), fs->img,
             fs->in_ch ? (fs->in_ch == 1 ? "grey" : "rgb") : "auto", fs->background, fs->skip_bad ? "-skipbad" : "");
    snprintf(path, sizeof path, "%s/cache", fs->cache_dir);
    mkdir_p(path);
    // One process decodes at a time (MPI ranks, two runs): the others wait, then map.
    int lock = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (lock < 0 || flock(lock, LOCK_EX) != 0) die("cannot lock %s: %s", path, strerror(errno));
    snprintf(path + strlen(path), sizeof path - strlen(path), "/%s.pix", name);
    uint64_t key = folder_key(&l, fs);
    if (!pixel_cache_map(d, path, key, fs, 1)) {
        if (ignored) fprintf(stderr, "%s: %ld files that are not pictures stb_image reads are left out\n", fs->dir, ignored);
        pixel_cache_build(&l, fs, key, path);
        if (!pixel_cache_map(d, path, key, fs, 0)) die("%s: the cache just written does not read back; check the disk", path);
    }
    close(lock);
    snprintf(d->name, sizeof d->name, "%.31s", base);
    for (long i = 0; i < l.n; i++) free(l.path[i]);
    free(l.path); free(l.seen);
}

static void dataset_load(Dataset* d, const char* name, const char* dir, int train) {
    memset(d, 0, sizeof *d);
    if (!strcmp(name, "cifar10")) load_cifar10(d, dir, train);
    else if (!strcmp(name, "fashion-mnist")) load_fashion_mnist(d, dir, train);
    else die("--data %s: unknown dataset; use cifar10 or fashion-mnist", name);
}

// Drops a mapped cache's pages from this process (they stay in the kernel's page cache):
// called after every training step, it keeps the resident memory of a dataset larger than
// memory at one batch's pictures.
static void dataset_forget(const Dataset* d) {
#ifdef MADV_DONTNEED
    if (d->mapped) madvise(d->pixels - PIXEL_CACHE_DATA, d->mapped, MADV_DONTNEED);
#else
    (void)d;
#endif
}

static void dataset_free(Dataset* d) {
    if (d->mapped) munmap(d->pixels - PIXEL_CACHE_DATA, d->mapped);
    else free(d->pixels);
    free(d->labels);
}

// ----------------------------------------------------------------------------
// 20. Checkpoints
//
// A checkpoint is everything needed to continue bit-exactly: the header below, then four
// float32 arrays of n_params values (parameters, EMA, Adam m, Adam v, in the layout of the
// tensor table, section 15), then a 64-bit FNV-1a checksum of all preceding bytes;
// little-endian, written atomically (section 18).
#define CKPT_MAGIC "DDPMCKPT"
#define CKPT_VERSION 1

typedef struct {
    char magic[8];               // "DDPMCKPT"
    uint32_t version;            // CKPT_VERSION
    uint32_t header_bytes;       // sizeof(CheckpointHeader)
    int32_t in_ch, img, ch, n_levels, ch_mult[MAX_LEVELS], num_res_blocks, n_attn,
            attn_res[MAX_LEVELS], groups;   // the Config
    float dropout;
    int32_t schedule, T;         // ScheduleKind and T
    int32_t batch;
    uint8_t mean_type, var_type, loss_type, pad;   // the Objective (sections 4, 6); 0 0 0 is the paper's
    uint64_t step;
    uint64_t rng[4];             // the RNG state after `step` steps
    uint64_t n_params;
} CheckpointHeader;
_Static_assert(sizeof(CheckpointHeader) == 160, "checkpoint header layout changed: bump CKPT_VERSION");

static void header_from_config(CheckpointHeader* hd, const Config* c) {
    hd->in_ch = c->in_ch; hd->img = c->img; hd->ch = c->ch; hd->n_levels = c->n_levels;
    for (int i = 0; i < MAX_LEVELS; i++) { hd->ch_mult[i] = c->ch_mult[i]; hd->attn_res[i] = c->attn_res[i]; }
    hd->num_res_blocks = c->num_res_blocks; hd->n_attn = c->n_attn; hd->groups = c->groups;
    hd->dropout = c->dropout;
}

static Config config_from_header(const CheckpointHeader* hd) {
    Config c = {0};
    c.in_ch = hd->in_ch; c.img = hd->img; c.ch = hd->ch; c.n_levels = hd->n_levels;
    for (int i = 0; i < MAX_LEVELS; i++) { c.ch_mult[i] = hd->ch_mult[i]; c.attn_res[i] = hd->attn_res[i]; }
    c.num_res_blocks = hd->num_res_blocks; c.n_attn = hd->n_attn; c.groups = hd->groups;
    c.dropout = hd->dropout;
    c.learn_sigma = hd->var_type == VAR_LEARNED;
    return c;
}

static Objective objective_from_header(const CheckpointHeader* hd) {
    Objective ob = {(MeanType)hd->mean_type, (VarType)hd->var_type, (LossType)hd->loss_type};
    return ob;
}

// Returns 0 on success, else a one-line reason in err, PATH untouched (section 18).
static int checkpoint_save(const Trainer* tr, ScheduleKind sk, const char* path, char* err, size_t errlen) {
    size_t n = tr->net.n_params;
    if (!all_finite(tr->net.params, n) || !all_finite(tr->ema, n)) {   // never save a diverged state
        snprintf(err, errlen, "not saving %s: the parameters are not finite (the run diverged); "
                 "the previous checkpoint is intact", path);
        return -1;
    }
    AtomicFile af;
    FILE* f = atomic_open(&af, path, err, errlen);
    if (!f) return -1;
    CheckpointHeader hd;
    memset(&hd, 0, sizeof hd);
    memcpy(hd.magic, CKPT_MAGIC, 8);
    hd.version = CKPT_VERSION;
    hd.header_bytes = sizeof hd;
    hd.mean_type = (uint8_t)tr->obj.mean; hd.var_type = (uint8_t)tr->obj.var; hd.loss_type = (uint8_t)tr->obj.loss;
    header_from_config(&hd, &tr->net.cfg);
    hd.schedule = sk; hd.T = tr->sched.T; hd.batch = tr->B;
    hd.step = tr->step;
    memcpy(hd.rng, tr->rng.s, sizeof hd.rng);
    hd.n_params = tr->net.n_params;
    Fnv sum = FNV_START;
    size_t nb = tr->net.n_params * sizeof(float);
    int ok = write_all(f, &hd, sizeof hd, &sum) && write_all(f, tr->net.params, nb, &sum) &&
             write_all(f, tr->ema, nb, &sum) && write_all(f, tr->adam_m, nb, &sum) &&
             write_all(f, tr->adam_v, nb, &sum);
    uint64_t h = sum.h;
    ok = ok && write_all(f, &h, sizeof h, NULL);
    if (atomic_commit(&af, ok, err, errlen) == 0) return 0;
    size_t k = strlen(err);
    snprintf(err + k, errlen - k, "; the previous checkpoint (if any) is intact");
    return -1;
}

// Verifies a checkpoint (size, checksum, header) and returns it positioned after the
// header; dies with a one-line reason on any problem.
static FILE* checkpoint_open(const char* path, CheckpointHeader* hd) {
    long size = file_size(path);
    if (size < 0 && errno != ENOENT) die("cannot read checkpoint %s: %s", path, strerror(errno));
    if (size < 0) die("checkpoint %s not found; train first (./ddpm) or pass --checkpoint PATH", path);
    FILE* f = fopen_regular(path, NULL);
    if (size < (long)sizeof *hd || fread(hd, sizeof *hd, 1, f) != 1 || memcmp(hd->magic, CKPT_MAGIC, 8))
        die("%s is not a ddpm.c checkpoint (bad magic); pass a file written by ./ddpm train", path);
    if (hd->version != CKPT_VERSION || hd->header_bytes != sizeof *hd)
        die("%s is a version %u checkpoint; this ddpm.c reads version %d", path, hd->version, CKPT_VERSION);
    // Verify the checksum over the whole file before trusting any field of the header:
    // a flipped bit in `ch` would otherwise ask for terabytes of activations.
    // (n_params is compared with the size it implies before it is multiplied: no overflow)
    if (hd->n_params > (uint64_t)size / 16)
        die("%s: its header promises %llu parameters, more than its %ld bytes hold; the file is truncated or corrupt",
            path, (unsigned long long)hd->n_params, size);
    long want = (long)sizeof *hd + 16L * (long)hd->n_params + 8;
    if (size != want)
        die("%s is %ld bytes but its header promises %ld: the file is truncated or corrupt; restore a copy or train again",
            path, size, want);
    Fnv sum = FNV_START;
    uint8_t chunk[1 << 16];
    fseek(f, 0, SEEK_SET);
    for (long left = size - 8; left > 0;) {
        size_t k = left < (long)sizeof chunk ? (size_t)left : sizeof chunk;
        fread_check(chunk, k, f, path);
        fnv_update(&sum, chunk, k);
        left -= (long)k;
    }
    uint64_t stored;
    fread_check(&stored, sizeof stored, f, path);
    if (stored != sum.h) die("%s fails its checksum: the file is corrupt; restore a copy or train again", path);
    fseek(f, sizeof *hd, SEEK_SET);
    Config c = config_from_header(hd);
    Objective ob = objective_from_header(hd);
    if (hd->mean_type > MEAN_X0 || hd->var_type > VAR_LEARNED || hd->loss_type > LOSS_KL || hd->pad ||
        objective_check(&ob, NULL) ||
        hd->n_levels <= 0 || hd->n_levels > MAX_LEVELS || hd->n_attn < 0 || hd->n_attn > MAX_LEVELS ||
        config_check(&c, NULL) || (hd->schedule != SCHEDULE_LINEAR && hd->schedule != SCHEDULE_COSINE) || hd->T != 1000)
        die("%s: the header holds an invalid configuration; the file is corrupt", path);
    // The checksum only catches accidents: an edited header can be re-sealed. So the
    // header must also agree with itself before anything is built from it.
    size_t need = unet_count_params(&c);
    if (need != hd->n_params)
        die("%s: its header's network has %zu parameters but the header says %llu; the file is corrupt",
            path, need, (unsigned long long)hd->n_params);
    if (hd->step > (1ULL << 40) || hd->batch <= 0 || hd->batch > 4096)
        die("%s: the header's step %llu or batch %d is out of range; the file is corrupt",
            path, (unsigned long long)hd->step, hd->batch);
    return f;
}

// Loads the four arrays into a trainer built with the header's config.
static void checkpoint_load(Trainer* tr, const char* path) {
    CheckpointHeader hd;
    FILE* f = checkpoint_open(path, &hd);
    if (hd.n_params != tr->net.n_params)
        die("%s holds %llu parameters but the network has %zu: the configuration does not match (--model)",
            path, (unsigned long long)hd.n_params, tr->net.n_params);
    size_t nb = tr->net.n_params * sizeof(float);
    float* arrays[4] = {tr->net.params, tr->ema, tr->adam_m, tr->adam_v};
    for (int i = 0; i < 4; i++) fread_check(arrays[i], nb, f, path);
    fclose(f);
    for (int i = 0; i < 4; i++)
        if (!all_finite(arrays[i], tr->net.n_params))
            die("%s holds non-finite values (NaN or inf) in its %s; the file is corrupt", path,
                (const char*[]){"parameters", "EMA", "Adam moments", "Adam moments"}[i]);
    tr->step = hd.step;
    memcpy(tr->rng.s, hd.rng, sizeof hd.rng);
}

// The EMA weights of a checkpoint, into a network built from its header, for sampling
// and evaluation (the live parameters and Adam's moments are not needed).
// load_ema reads on from a checkpoint that checkpoint_open has checked (f, its header hd),
// and closes it; load_ema_model does both, and gives the header (hd may be NULL).
static void load_ema(UNet* m, Schedule* s, FILE* f, const CheckpointHeader* hd, const char* path, int B_max) {
    Config c = config_from_header(hd);
    unet_build(m, &c, B_max);
    if (hd->n_params != m->n_params) die("%s: its header and its size disagree; the file is corrupt", path);
    size_t nb = m->n_params * sizeof(float);
    fread_check(m->grads, nb, f, path);    // the live parameters: skipped
    fread_check(m->params, nb, f, path);   // the EMA
    fclose(f);
    if (!all_finite(m->params, m->n_params))
        die("%s holds non-finite values (NaN or inf) in its EMA; the file is corrupt", path);
    zero(m->grads, m->n_params);
    schedule_init(s, hd->T, (ScheduleKind)hd->schedule);
}

static void load_ema_model(UNet* m, Schedule* s, CheckpointHeader* hd, const char* path, int B_max) {
    CheckpointHeader h;
    FILE* f = checkpoint_open(path, &h);
    load_ema(m, s, f, &h, path, B_max);
    if (hd) *hd = h;
}

// ----------------------------------------------------------------------------
// 21. Pictures and files: PNG grids (stb_image_write), .npy and .npz arrays, exchange files

#define STB_IMAGE_WRITE_IMPLEMENTATION
#define STB_IMAGE_WRITE_STATIC
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#pragma GCC diagnostic ignored "-Wsign-compare"
#endif
#include "stb_image_write.h"
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif

static uint8_t to_pixel(float x) {   // [-1, 1] -> 0..255, the inverse of §3.3's scaling
    float v = (x + 1.0f) * 127.5f + 0.5f;
    return (uint8_t)(v > 255 ? 255 : v >= 0 ? v : 0);   // NaN -> 0, never (uint8_t)NaN
}

// One image (C, H, W) in [-1, 1] into a GW-pixel-wide picture of comp channels (1: grey,
// 3: RGB), its top left corner at (ox, oy).
static void put_image(uint8_t* buf, int GW, int comp, int ox, int oy, const float* img, int C, int H, int W) {
    for (int y = 0; y < H; y++)
        for (int x = 0; x < W; x++)
            for (int c = 0; c < comp; c++)
                buf[((size_t)(oy + y) * GW + ox + x) * comp + c] = to_pixel(img[((size_t)(C == 1 ? 0 : c) * H + y) * W + x]);
}

// The picture as a PNG, encoded in memory, then written by write_file_atomic: stb's own
// file writer ignores write errors, and a full disk would leave an empty "written" file.
static int write_png(const char* path, const uint8_t* buf, int GW, int GH, int comp) {
    int len = 0;
    unsigned char* png = stbi_write_png_to_mem(buf, GW * comp, GW, GH, comp, &len);
    if (!png) die("out of memory encoding %s", path);
    int r = write_file_atomic(path, png, (size_t)len, NULL, 0);
    STBIW_FREE(png);
    return r;
}

// n images (C, H, W) in [-1, 1] as a grid of `cols` columns with 2-pixel gaps.
static int save_grid_png(const char* path, const float* imgs, int n, int C, int H, int W, int cols) {
    if (n <= 0) return 0;
    int rows = (n + cols - 1) / cols, gap = 2;
    int GW = cols * (W + gap) + gap, GH = rows * (H + gap) + gap, comp = C == 1 ? 1 : 3;
    uint8_t* buf = malloc_check((size_t)GW * GH * comp, "an image grid");
    memset(buf, 255, (size_t)GW * GH * comp);
    for (int i = 0; i < n; i++)
        put_image(buf, GW, comp, gap + (i % cols) * (W + gap), gap + (i / cols) * (H + gap),
                  imgs + (size_t)i * C * H * W, C, H, W);
    int r = write_png(path, buf, GW, GH, comp);
    free(buf);
    return r;
}

// For a debugger: `call show(x_t, 1, 1, 32, 32)` in gdb writes the B images of a
// (B, C, H, W) tensor as a grid (the sample grids' mapping, [-1, 1] to 0..255) to
// show_1.png, then show_2.png, ..., and prints each image's mean, standard deviation, min
// and max (README, gdb).
__attribute__((used)) static void show(const float* x, int B, int C, int H, int W) {
    static int calls;
    char path[32];
    snprintf(path, sizeof path, "show_%d.png", ++calls);
    size_t n = (size_t)C * H * W;
    for (int b = 0; b < B; b++) {
        double sum = 0, sq = 0, lo = INFINITY, hi = -INFINITY;
        for (const float* p = x + b * n; p < x + (b + 1) * n; p++)
            sum += *p, sq += (double)*p * *p, lo = fmin(lo, *p), hi = fmax(hi, *p);
        double mean = sum / n;
        printf("image %d: mean %.4f, std %.4f, min %.4f, max %.4f\n", b, mean, sqrt(fmax(0, sq / n - mean * mean)), lo, hi);
    }
    if (save_grid_png(path, x, B, C, H, W, (int)ceil(sqrt(B))) == 0) printf("wrote %s\n", path);
    fflush(stdout);
}

// The learning film, progress.png: one row per preview of a training run (section 22),
// each the same few samples (the same x_T) at that step, with the step written at its
// left. A row is appended to the film on disk, so a resumed run continues it; a file
// that is not such a film (another --sample-n, --img, a damaged file) is started again.
// The digits are a 3x5 pixel font, a row of 3 bits each from the top, scaled up with H.
static const uint16_t DIGITS_3X5[10] = {0x7b6f, 0x2c97, 0x73e7, 0x73cf, 0x5bc9, 0x79cf, 0x79ef, 0x7249, 0x7bef, 0x7bcf};
#define FILM_DIGITS 7   // steps up to 9,999,999 are written; later ones are left blank

static int film_append(const char* path, const float* imgs, int k, int C, int H, int W, unsigned long long step) {
    int gap = 2, sc = H / 16 < 1 ? 1 : H / 16 > 4 ? 4 : H / 16, comp = C == 1 ? 1 : 3;
    int label = FILM_DIGITS * 4 * sc + 2 * gap, GW = label + k * (W + gap), RH = H + gap;
    // the film so far: its size is checked before it is decoded
    int w = 0, h = 0, c = 0, rows = 0;
    uint8_t* old = NULL;
    const char* why;
    FILE* f = picture_open(path, &why);   // not fopen: a FIFO put there would block it
    int existed = f != NULL;
    if (f && stbi_info_from_file(f, &w, &h, &c) && w == GW && h > gap && (h - gap) % RH == 0 && h / RH < 100000)
        old = stbi_load_from_file(f, &w, &h, &c, comp);
    if (f) fclose(f);
    if (existed && !old) fprintf(stderr, "%s is not this run's film (another --sample-n or --img?); starting it again\n", path);
    rows = old ? (h - gap) / RH : 0;
    size_t GH = (size_t)gap + (size_t)(rows + 1) * RH, stride = (size_t)GW * comp;
    uint8_t* buf = malloc_check(GH * stride, "the film");
    memset(buf, 255, GH * stride);
    if (old) memcpy(buf, old, (size_t)h * stride);
    stbi_image_free(old);
    for (int i = 0; i < k; i++)
        put_image(buf, GW, comp, label + i * (W + gap), gap + rows * RH, imgs + (size_t)i * C * H * W, C, H, W);
    uint8_t* row = buf + (size_t)(gap + rows * RH) * stride;
    char digits[32];
    int nd = snprintf(digits, sizeof digits, "%llu", step), top = (H - 5 * sc) / 2;
    for (int d = 0; d < nd && nd <= FILM_DIGITS; d++) {   // right-aligned against the first image
        int x0 = label - gap - (nd - d) * 4 * sc;
        for (int gy = 0; gy < 5 * sc; gy++)
            for (int gx = 0; gx < 3 * sc; gx++)
                if (DIGITS_3X5[digits[d] - '0'] >> (14 - (gy / sc) * 3 - gx / sc) & 1)
                    memset(row + (size_t)(top + gy) * stride + (size_t)(x0 + gx) * comp, 0, comp);
    }
    int r = write_png(path, buf, GW, (int)GH, comp);
    free(buf);
    return r;
}

// NumPy's .npy format, version 1.0: magic, header length, a Python dict literal padded
// with spaces to a multiple of 64 bytes, then the raw little-endian data. npy_header
// fills head (330 bytes at most) for elements of type descr ('<f4', '|u1') and returns
// its length; count gets the number of elements.
static size_t npy_header(char* head, const char* descr, int ndim, const int* shape, size_t* count) {
    char dict[256], sh[128] = "";
    *count = 1;
    for (int i = 0; i < ndim; i++) {
        char d[24];
        snprintf(d, sizeof d, "%d%s", shape[i], ndim == 1 ? "," : i + 1 < ndim ? ", " : "");
        strncat(sh, d, sizeof sh - strlen(sh) - 1);
        *count *= shape[i];
    }
    int len = snprintf(dict, sizeof dict, "{'descr': '%s', 'fortran_order': False, 'shape': (%s), }", descr, sh);
    int total = 10 + len + 1, pad = (64 - total % 64) % 64;
    uint16_t hl = (uint16_t)(len + pad + 1);
    memcpy(head, "\x93NUMPY\x01\x00", 8);
    memcpy(head + 8, &hl, 2);
    memcpy(head + 10, dict, len);
    memset(head + 10 + len, ' ', pad);
    head[10 + len + pad] = '\n';
    return (size_t)total + pad;
}

static int save_npy(const char* path, const float* data, int ndim, const int* shape) {
    char head[10 + 256 + 64];
    size_t count, hl = npy_header(head, "<f4", ndim, shape, &count);
    return write_file_atomic(path, head, hl, data, count * sizeof(float));
}

// The CRC-32 of ZIP (polynomial 0xEDB88320), a byte at a time through a 256-entry table.
static uint32_t crc32_update(uint32_t crc, const uint8_t* p, size_t n) {
    static uint32_t table[256];
    if (!table[1])
        for (uint32_t i = 0; i < 256; i++) {
            uint32_t c = i;
            for (int k = 0; k < 8; k++) c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
            table[i] = c;
        }
    crc = ~crc;
    for (size_t i = 0; i < n; i++) crc = table[(crc ^ p[i]) & 0xff] ^ (crc >> 8);
    return ~crc;
}

static uint8_t* put_le(uint8_t* p, uint64_t v, int bytes) {
    for (int i = 0; i < bytes; i++) p[i] = (uint8_t)(v >> (8 * i));
    return p + bytes;
}

// The fields a ZIP local header and its central directory entry share: version needed
// 2.0, no flags, stored, 1980-01-01 00:00, the CRC, both sizes, the name's length, no extra.
static uint8_t* zip_member_fields(uint8_t* p, uint32_t crc, size_t size, size_t name_len) {
    p = put_le(p, 20, 2); p = put_le(p, 0, 2); p = put_le(p, 0, 2); p = put_le(p, 0, 2); p = put_le(p, 0x21, 2);
    p = put_le(p, crc, 4); p = put_le(p, size, 4); p = put_le(p, size, 4);
    return put_le(put_le(p, name_len, 2), 0, 2);
}

// --npz: the samples as numpy.savez writes them, one array arr_0 of uint8, N x H x W x C,
// the input of the usual FID tools (the evaluator of Dhariwal & Nichol; pytorch-fid and
// clean-fid through numpy): a ZIP archive of one stored member, arr_0.npy, so a local
// header, the .npy, a central directory entry and the end record.
static int save_npz(const char* path, const float* imgs, int N, int C, int H, int W) {
    int shape[4] = {N, H, W, C};
    char head[10 + 256 + 64];
    size_t count, hl = npy_header(head, "|u1", 4, shape, &count);
    size_t member = hl + count;
    if (member >= 0xffffffffu) {
        error_line("%s: %d samples are over the 4 GiB of a plain ZIP; write fewer with -n", path, N);
        return -1;
    }
    const char name[] = "arr_0.npy";
    size_t nl = sizeof name - 1, total = 30 + nl + member + 46 + nl + 22;
    uint8_t* buf = malloc_check(total, "the .npz file");
    uint8_t* npy = buf + 30 + nl;
    memcpy(npy, head, hl);
    for (int i = 0; i < N; i++)               // NCHW floats -> NHWC bytes
        for (int c = 0; c < C; c++)
            for (int y = 0; y < H; y++)
                for (int x = 0; x < W; x++)
                    npy[hl + (((size_t)i * H + y) * W + x) * C + c] = to_pixel(imgs[(((size_t)i * C + c) * H + y) * W + x]);
    uint32_t crc = crc32_update(0, npy, member);
    // the local file header, then its name; the member follows it
    uint8_t* p = zip_member_fields(put_le(buf, 0x04034b50, 4), crc, member, nl);
    memcpy(p, name, nl);
    p += nl + member;
    // the central directory's one entry (made by version 2.0): no comment, disk 0, no
    // attributes, the local header at offset 0
    uint8_t* cd = p;
    p = zip_member_fields(put_le(put_le(p, 0x02014b50, 4), 20, 2), crc, member, nl);
    p = put_le(p, 0, 2); p = put_le(p, 0, 2); p = put_le(p, 0, 2); p = put_le(p, 0, 4); p = put_le(p, 0, 4);
    memcpy(p, name, nl);
    p += nl;
    // end of central directory: one entry, its size and offset
    size_t cd_off = (size_t)(cd - buf), cd_size = (size_t)(p - cd);
    p = put_le(p, 0x06054b50, 4); p = put_le(p, 0, 2); p = put_le(p, 0, 2); p = put_le(p, 1, 2); p = put_le(p, 1, 2);
    p = put_le(p, cd_size, 4); p = put_le(p, cd_off, 4); p = put_le(p, 0, 2);
    int r = write_file_atomic(path, buf, (size_t)(p - buf), NULL, 0);
    free(buf);
    return r;
}

// The chain of Fig. 6 as a strip: one row per image, one column per recorded step.
static int save_trace_png(const char* path, const float* frames, const Trace* tr, int C, int H, int W) {
    size_t n = (size_t)C * H * W;
    float* grid = malloc_check((size_t)tr->n_images * tr->n_steps * n * sizeof(float), "a trace strip");
    for (int i = 0; i < tr->n_images; i++)
        for (int k = 0; k < tr->n_steps; k++)
            memcpy(grid + ((size_t)i * tr->n_steps + k) * n, frames + ((size_t)k * tr->n_images + i) * n, n * sizeof(float));
    int r = save_grid_png(path, grid, tr->n_images * tr->n_steps, C, H, W, tr->n_steps);
    free(grid);
    return r;
}

// Weights from elsewhere: the exchange format of tests/reference.py. Named float32 arrays,
// little-endian: "DDPMREF1", int32 n_records, then per record int32 name_len, the name,
// int32 ndim, int32 shape[ndim], float32 data[prod(shape)]. A network's weights are the
// records param.NAME (the state_dict names of section 15's tensor table); config.* records
// carry its shape (in_ch, ch, ch_mult, num_res_blocks, attn_resolutions, groups, img, and
// optionally objective and dropout), meta.step the step (as step mod 2^24 and step / 2^24
// when one float32 cannot hold it). `export` writes a checkpoint's EMA weights this way;
// `import` makes a checkpoint of such a file (tests/train_torch.py, data/convert_official.py).
#define EXCHANGE_MAGIC "DDPMREF1"
#define EXCHANGE_MAX_DIMS 8

typedef struct { const char* name; int name_len, ndim, shape[EXCHANGE_MAX_DIMS]; size_t count; const uint8_t* data; } ExRecord;
typedef struct { const uint8_t* bytes; size_t len; ExRecord* rec; int n; } Exchange;   // bytes: the file, mapped

// A record's name as it may be printed: bytes outside printable ASCII as \xNN, so a
// hostile name cannot break the one-line message or send the terminal escape codes.
static const char* ex_name(const char* name, int len) {
    static char buf[2][300];
    static int which;
    char* s = buf[which ^= 1];
    int k = 0;
    s[0] = 0;
    for (int i = 0; i < len; i++) {
        if (k > (int)sizeof buf[0] - 8) { strcpy(s + k, "..."); break; }
        unsigned char c = (unsigned char)name[i];
        k += snprintf(s + k, 8, c >= 32 && c < 127 && c != '\\' ? "%c" : "\\x%02x", c);
    }
    return s;
}
#define EXNAME(r) ex_name((r)->name, (r)->name_len)

static int32_t get_le32(const uint8_t* p) { return (int32_t)((uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24); }

// Maps and indexes the file; dies with one line naming the file and the record on
// anything malformed (every length is checked against what is left of the file).
static void exchange_read(Exchange* x, const char* path) {
    memset(x, 0, sizeof *x);
    FILE* f = fopen_regular(path, NULL);
    long size = file_size(path);
    if (size < 12) die("%s is not an exchange file (%ld bytes); pass a file written by ./ddpm export or tests/train_torch.py", path, size);
    char magic[8];   // the magic first: a large file of another kind is refused before it is read
    fread_check(magic, 8, f, path);
    if (memcmp(magic, EXCHANGE_MAGIC, 8)) die("%s is not an exchange file (bad magic; want %s)", path, EXCHANGE_MAGIC);
    // Mapped, not read: the records are indexed where they lie, and a tensor's pages are
    // read from disk only when it is copied out, so a huge file costs no memory up front.
    x->len = (size_t)size;
    void* p = mmap(NULL, x->len, PROT_READ, MAP_PRIVATE, fileno(f), 0);
    fclose(f);
    if (p == MAP_FAILED) die("cannot map %s (%.1f GiB): %s", path, size / 1073741824.0, strerror(errno));
    x->bytes = p;
    int32_t n = get_le32(x->bytes + 8);
    if (n < 0 || (size_t)n > (x->len - 12) / 12) die("%s: bad record count %d; the file is corrupt", path, n);
    x->rec = malloc_check((size_t)(n ? n : 1) * sizeof(ExRecord), "the exchange index");
    size_t pos = 12;
    #define NEED(k, what) do { if ((size_t)(k) > x->len - pos) \
        die("%s is truncated in record %d (%s); re-create it", path, x->n, what); } while (0)
    for (x->n = 0; x->n < n; x->n++) {
        ExRecord* r = &x->rec[x->n];
        NEED(4, "name length");
        r->name_len = get_le32(x->bytes + pos); pos += 4;
        if (r->name_len <= 0 || r->name_len > 4096) die("%s: record %d has a bad name length %d; the file is corrupt", path, x->n, r->name_len);
        NEED(r->name_len + 4, "name");
        r->name = (const char*)x->bytes + pos; pos += r->name_len;
        r->ndim = get_le32(x->bytes + pos); pos += 4;
        if (r->ndim < 0 || r->ndim > EXCHANGE_MAX_DIMS) die("%s: %s has %d dimensions; the file is corrupt", path, EXNAME(r), r->ndim);
        NEED(4 * r->ndim, "shape");
        r->count = 1;
        for (int d = 0; d < r->ndim; d++, pos += 4) {
            r->shape[d] = get_le32(x->bytes + pos);
            if (r->shape[d] < 0 || (r->shape[d] && r->count > (x->len - pos) / 4 / (size_t)r->shape[d]))
                die("%s: %s has a bad shape (dimension %d is %d); the file is corrupt", path, EXNAME(r), d, r->shape[d]);
            r->count *= (size_t)r->shape[d];
        }
        NEED(4 * r->count, "data");
        r->data = x->bytes + pos; pos += 4 * r->count;
    }
    #undef NEED
    if (pos != x->len) die("%s has %zu bytes after its %d records; the file is corrupt", path, x->len - pos, n);
}

static void exchange_free(Exchange* x) {
    if (x->bytes) munmap((void*)x->bytes, x->len);
    free(x->rec);
}

static int exchange_is(const ExRecord* r, const char* name) {
    return (size_t)r->name_len == strlen(name) && !memcmp(r->name, name, r->name_len);
}

// The record NAME, or NULL; a name that two records carry is refused.
static const ExRecord* exchange_find(const Exchange* x, const char* name, const char* path) {
    const ExRecord* r = NULL;
    for (int i = 0; i < x->n; i++)
        if (exchange_is(&x->rec[i], name)) {
            if (r) die("%s holds %s twice; the file is corrupt", path, name);
            r = &x->rec[i];
        }
    return r;
}

// A config.* or meta.* record's values as integers (they are stored as floats); -1 if
// the record is absent, else the number of values read (at most max).
static int exchange_ints(const Exchange* x, const char* name, int* v, int max, const char* path) {
    const ExRecord* r = exchange_find(x, name, path);
    if (!r) return -1;
    if (r->count > (size_t)max) die("%s: %s holds %zu values, at most %d make sense", path, name, r->count, max);
    for (size_t i = 0; i < r->count; i++) {
        float f;
        memcpy(&f, r->data + 4 * i, 4);
        if (!(f >= 0 && f <= 1e9f && f == floorf(f))) die("%s: %s holds %g, not a count", path, name, f);
        v[i] = (int)f;
    }
    return (int)r->count;
}

// The network a file describes: its config.* records (all seven, or none: then *c is
// left as the caller's), and the objective if it names one (else *ob is left). Returns
// 1 if it had the network's records, + 2 if it had config.objective.
static int exchange_config(const Exchange* x, Config* c, Objective* ob, const char* path) {
    int v[MAX_LEVELS], got = 0, has_obj = 0;
    const char* scalars[] = {"config.in_ch", "config.ch", "config.num_res_blocks", "config.groups", "config.img"};
    int* dst[] = {&c->in_ch, &c->ch, &c->num_res_blocks, &c->groups, &c->img};
    for (int i = 0; i < 5; i++) got += exchange_find(x, scalars[i], path) != NULL;
    got += exchange_find(x, "config.ch_mult", path) != NULL;
    got += exchange_find(x, "config.attn_resolutions", path) != NULL;
    if (got != 0 && got != 7) die("%s has only some of the seven config.* records; it needs all or none", path);
    int k[3], nk = exchange_ints(x, "config.objective", k, 3, path);
    if (nk >= 0) {
        if (nk != 3) die("%s: config.objective holds %d values, not 3 (mean, variance, loss)", path, nk);
        if (k[0] > 2 || k[1] > 2 || k[2] > 2) die("%s: config.objective names an unknown kind", path);
        ob->mean = (MeanType)k[0]; ob->var = (VarType)k[1]; ob->loss = (LossType)k[2];
        has_obj = 2;
    }
    const ExRecord* d = exchange_find(x, "config.dropout", path);
    if (d) {
        float p;
        if (d->count != 1) die("%s: config.dropout holds %zu values, not 1", path, d->count);
        memcpy(&p, d->data, 4);
        if (!(p >= 0 && p < 1)) die("%s: config.dropout is %g, not a probability in [0, 1)", path, p);
        c->dropout = p;
    }
    if (!got) return has_obj;
    for (int i = 0; i < 5; i++) {
        if (exchange_ints(x, scalars[i], v, 1, path) != 1) die("%s: %s should hold one value", path, scalars[i]);
        *dst[i] = v[0];
    }
    c->n_levels = exchange_ints(x, "config.ch_mult", c->ch_mult, MAX_LEVELS, path);
    c->n_attn = exchange_ints(x, "config.attn_resolutions", c->attn_res, MAX_LEVELS, path);
    c->learn_sigma = ob->var == VAR_LEARNED;
    const char* why = config_check(c, NULL);
    if (why) die("%s describes a network ddpm.c cannot build: %s", path, why);
    return 1 + has_obj;
}

// Copies every param.NAME record into dst (the network's parameter layout), or with dst
// NULL only checks them (against a plan, unet_plan); dies on a tensor that is missing,
// unknown, repeated, misshapen or not finite, naming it.
static void exchange_weights(const Exchange* x, const UNet* m, float* dst, const char* path) {
    const UNetLayers* L = m->L;
    uint8_t* seen = calloc_check(L->n_tensors, 1, "the exchange index");
    for (int i = 0; i < x->n; i++) {
        const ExRecord* r = &x->rec[i];
        if (r->name_len < 6 || memcmp(r->name, "param.", 6)) continue;   // config.*, meta.*, inputs: not weights
        int j = 0;
        while (j < L->n_tensors && !(strlen(L->tensors[j].name) == (size_t)r->name_len - 6 &&
                                     !memcmp(L->tensors[j].name, r->name + 6, r->name_len - 6))) j++;
        if (j == L->n_tensors) die("%s: %s is not a tensor of this network; check its configuration", path, EXNAME(r));
        const ParamTensor* t = &L->tensors[j];
        int same = r->ndim == t->ndim;
        for (int d = 0; same && d < t->ndim; d++) same = r->shape[d] == t->shape[d];
        if (!same) die("%s: %s has the wrong shape for this network (%zu values, want %zu); check its configuration",
                       path, EXNAME(r), r->count, t->numel);
        if (seen[j]++) die("%s holds %s twice; the file is corrupt", path, EXNAME(r));
        for (size_t k = 0; k < t->numel; k++) {   // little-endian float32, as this machine
            float v;
            memcpy(&v, r->data + 4 * k, 4);
            if (!isfinite(v)) die("%s: %s holds NaN or inf", path, EXNAME(r));
        }
        if (dst) memcpy(dst + t->offset, r->data, 4 * t->numel);
    }
    for (int j = 0; j < L->n_tensors; j++)
        if (!seen[j]) die("%s has no param.%s; it does not hold this network's weights", path, L->tensors[j].name);
    free(seen);
}

// The writer's side: records written straight into PATH.tmp (section 18's atomic writer),
// so a 1.8 GB network needs no copy of itself; n_records is patched in at the end.
typedef struct { AtomicFile af; FILE* f; int32_t n; int ok, err_no; } ExWriter;

static void ex_bytes(ExWriter* w, const void* b, size_t k) {
    if (w->ok && fwrite(b, 1, k, w->f) != k) w->ok = 0, w->err_no = errno;
}

static void ex_i32(ExWriter* w, int32_t v) {
    uint8_t b[4];
    put_le(b, (uint32_t)v, 4);
    ex_bytes(w, b, 4);
}

static void ex_record(ExWriter* w, const char* name, int ndim, const int* shape, const float* data) {
    size_t count = 1;
    ex_i32(w, (int32_t)strlen(name));
    ex_bytes(w, name, strlen(name));
    ex_i32(w, ndim);
    for (int d = 0; d < ndim; d++) ex_i32(w, shape[d]), count *= (size_t)shape[d];
    ex_bytes(w, data, 4 * count);
    w->n++;
}

static void ex_ints(ExWriter* w, const char* name, const int* v, int n) {
    float f[MAX_LEVELS];
    for (int i = 0; i < n; i++) f[i] = (float)v[i];
    ex_record(w, name, 1, &n, f);
}

// Starts the file at path: 0, or -1 after one line on stderr.
static int ex_begin(ExWriter* w, const char* path) {
    char err[4400];
    memset(w, 0, sizeof *w);
    w->f = atomic_open(&w->af, path, err, sizeof err);
    if (!w->f) { error_line("%s", err); return -1; }
    w->ok = 1;
    ex_bytes(w, EXCHANGE_MAGIC, 8);
    ex_i32(w, 0);   // n_records, patched by ex_finish
    return 0;
}

// The network's shape: the seven config.* records.
static void ex_config(ExWriter* w, const Config* c) {
    ex_ints(w, "config.in_ch", &c->in_ch, 1);
    ex_ints(w, "config.ch", &c->ch, 1);
    ex_ints(w, "config.ch_mult", c->ch_mult, c->n_levels);
    ex_ints(w, "config.num_res_blocks", &c->num_res_blocks, 1);
    ex_ints(w, "config.attn_resolutions", c->attn_res, c->n_attn);
    ex_ints(w, "config.groups", &c->groups, 1);
    ex_ints(w, "config.img", &c->img, 1);
}

// Finishes the file (atomically, section 18). Returns 0, or -1 after one line on stderr.
static int ex_finish(ExWriter* w) {
    char err[4400];
    uint8_t b[4];
    put_le(b, (uint32_t)w->n, 4);
    if (w->ok && (fseek(w->f, 8, SEEK_SET) != 0 || fwrite(b, 1, 4, w->f) != 4)) w->ok = 0, w->err_no = errno;
    errno = w->err_no;
    if (atomic_commit(&w->af, w->ok, err, sizeof err) == 0) return 0;
    error_line("%s", err);
    return -1;
}

// ----------------------------------------------------------------------------
// 22. main: the command line
//
// One table (OPTIONS, 22.1) says of every option its name, type, default, range, the
// commands that read it and its line in --help, which is printed from the table: a
// default is written once. A flag that the command does not read is refused, as is an
// unknown one or a value out of range (exit 2, one line). (The speed of a training and
// a sampling step is measured by tests/bench_ddpm.c, `make bench`, which includes this file.)

#ifdef DDPM_MPI
static void world_init(int* argc, char*** argv);   // section 23: joins the job, refuses unequal flags
static void world_finish(void);
#endif
static int world_max(int x);   // section 23: the largest x over the ranks (x itself in one process)

// ---- 22.1 The options: one table ----

#define MAX_THREADS 256   // more would only cost memory: every thread has its scratch

// The commands, as bits: an option lists those that read it.
enum { C_TRAIN = 1, C_SAMPLE = 2, C_BPD = 4, C_RECONSTRUCT = 8, C_INTERPOLATE = 16, C_EXPORT = 32,
       C_IMPORT = 64, C_SCHEDULE = 128, C_PARAMS = 256, C_HELP = 512 };
#define C_DECODE (C_RECONSTRUCT | C_INTERPOLATE)
#define C_MODEL (C_SAMPLE | C_BPD | C_DECODE)            // use a checkpoint's network
#define C_NET (C_TRAIN | C_PARAMS | C_IMPORT)            // build a network from the flags

typedef struct {
    const char* data;           // cifar10 | fashion-mnist | a folder of pictures
    const char* data_dir;
    const char* model;          // preset name
    const char* run_dir;
    const char* checkpoint;
    const char* out;
    const char* npz;            // sample --npz FILE
    const char* weights;        // import --weights FILE.ref
    const char* per_t;          // bpd --per-t FILE.csv
    int batch, sample_every, sample_n, n, trace, resume, threads, log_every;
    int img, background, skip_bad;   // a folder of pictures: its side, alpha's background, bad files
    int accumulate;             // micro-batches per step
    long steps;                 // train: total steps; sample, bpd: the chain's K steps
    long first_preview;         // train: the first preview's step (0: none)
    long seed;
    double minutes;             // wall-clock budget of a training run (0: none)
    Sampler sampler;            // --sigma, --sampler, --eta
    Objective obj;              // --mean-type, --var-type, --loss
    int t_samples;              // bpd --t-samples K: the KL terms estimated from K t per image
    int n_index, index[2];      // reconstruct, interpolate: --index
    int n_tlist, tlist[64];     // --t (1-based)
    int k, lambdas;             // reconstruct -k, interpolate --lambdas
    int schedule;               // ScheduleKind
    TrainHyper hyper;
    // network overrides (-1: keep the preset's)
    int ch, num_res_blocks, groups, in_ch, n_mult, ch_mult[MAX_LEVELS], n_attn, attn_res[MAX_LEVELS];
    float dropout;
    // what the command line said
    int cmd;                    // one of the C_* bits
    const char* cmd_name;
    unsigned char given[96];    // given[i]: OPTIONS[i] was on the command line
} Options;

typedef enum {
    OPT_ON, OPT_OFF,    // a switch: sets an int to 1, or to 0
    OPT_INT, OPT_LONG, OPT_FLOAT, OPT_DOUBLE,   // a number in [lo, hi]
    OPT_STR,            // a path or a name (one of `words` if given)
    OPT_WORD,           // one of `words`, stored as its index (an int or an enum)
    OPT_LIST,           // whole numbers in [lo, hi], comma-separated; their count at count_at
    OPT_HEADING         // not an option: a heading of --help
} OptType;

typedef struct {
    const char* name;           // "--batch", "-n"
    OptType type;
    size_t at;                  // offsetof(Options, its field)
    unsigned cmds;              // the commands that read it
    const char* def;            // its default as it would be typed, or NULL: the field's
                                // initial value (PAPER_HYPER, PAPER_OBJECTIVE) or none
    double lo, hi;
    const char* arg;            // its value in --help: "B", "linear|cosine"
    const char* help;
    const char* const* words;   // OPT_WORD, OPT_STR: the accepted words (NULL: any)
    size_t count_at;            // OPT_LIST: offsetof the count; max_count entries at most
    int max_count;
    int none;                   // OPT_LIST: the word "none" is an empty list (count -1)
} Option;

#define AT(field) offsetof(Options, field)

#define HEADING(text) {NULL, OPT_HEADING, 0, 0, NULL, 0, 0, NULL, text, NULL, 0, 0, 0}
static const char* const DATA_NAMES[] = {"cifar10", "fashion-mnist", NULL};
static const char* const SAMPLER_NAMES[] = {"ddpm", "ddim", "dpm++", NULL};  // SamplerKind
static const char* const SIGMA_NAMES[] = {"beta", "beta_tilde", NULL};       // VAR_FIXEDLARGE, VAR_FIXEDSMALL

static const Option OPTIONS[] = {
    HEADING("training (train; the network flags also apply to params and import):"),
    {"--data", OPT_STR, AT(data), C_NET | C_BPD | C_DECODE, "cifar10", .arg = "cifar10|fashion-mnist|DIR",
     .help = "the dataset (fashion-mnist works offline), or a folder of pictures (section 19.1; ./NAME for "
             "a folder called cifar10); bpd, reconstruct, interpolate: its test set, or a held-out folder"},
    {"--data-dir", OPT_STR, AT(data_dir), C_TRAIN | C_BPD | C_DECODE, "data", .arg = "DIR", .help =
     "where datasets live, and DIR/cache the decoded pictures of folders"},
    {"--img", OPT_INT, AT(img), C_NET, NULL, 16, 256, .arg = "N", .help =
     "a folder's pictures are cropped square and resized to N x N (a power of two, 16 to 256); tiny and small "
     "add a level per doubling (default: the preset's side, 32; paper256 256)"},
    {"--background", OPT_INT, AT(background), C_TRAIN | C_BPD | C_DECODE, "255", 0, 255, .arg = "V", .help =
     "a folder's transparent pixels are composited over grey level V (255: white)"},
    {"--skip-bad", OPT_ON, AT(skip_bad), C_TRAIN | C_BPD | C_DECODE, .help =
     "skip (and count) pictures that cannot be read, rather than stop at the first"},
    {"--model", OPT_STR, AT(model), C_NET, "tiny", .arg = "tiny|small|paper|paper256",
     .help = "the network preset (section 15; paper is Appendix B's 35.7M for CIFAR-10, paper256 the 114M of "
             "the paper's 256x256 LSUN and CelebA-HQ models)"},
    {"--batch", OPT_INT, AT(batch), C_TRAIN | C_IMPORT, NULL, 1, 4096, .arg = "B", .help =
     "images per step (import: the batch --resume will train at; --resume: the checkpoint's)"},
    {"--steps", OPT_LONG, AT(steps), C_TRAIN, NULL, 0, 1e9, .arg = "N", .help = "total training steps"},
    {"--accumulate", OPT_INT, AT(accumulate), C_TRAIN, "1", 1, 4096, .arg = "K", .help =
     "compute each step's batch as K micro-batches of B/K images (the same step in 1/K of the activation memory)"},
    {"--minutes", OPT_DOUBLE, AT(minutes), C_TRAIN, NULL, 0.01, 1e7, .arg = "M", .help =
     "stop after M minutes of training (checkpoint + samples)"},
    {"--run", OPT_STR, AT(run_dir), C_TRAIN, NULL, .arg = "DIR", .help = "the run folder (default runs/DATA-MODEL)"},
    {"--resume", OPT_ON, AT(resume), C_TRAIN, .help = "continue the checkpoint in the run folder"},
    {"--sample-every", OPT_INT, AT(sample_every), C_TRAIN, "2000", 1, 1e9, .arg = "N", .help =
     "a preview grid + checkpoint every N steps"},
    {"--first-preview", OPT_LONG, AT(first_preview), C_TRAIN, "250", 0, 1e9, .arg = "N", .help =
     "previews (DPM-Solver++, 10 steps, one fixed x_T; a row of progress.png each) also at steps N, 2N, 4N, ... "
     "below --sample-every; 0: none"},
    {"--sample-n", OPT_INT, AT(sample_n), C_TRAIN, "64", 0, 4096, .arg = "N", .help =
     "images in each grid (0: no grids); the run's last grid is Algorithm 2's, 1000 steps"},
    {"--log-every", OPT_INT, AT(log_every), C_TRAIN, "100", 1, 1e9, .arg = "N", .help =
     "plain progress lines every N steps when stderr is not a terminal"},
    {"--lr", OPT_FLOAT, AT(hyper.lr), C_TRAIN, NULL, 0, 1, .arg = "X", .help = "Adam's learning rate (Appendix B)"},
    {"--warmup", OPT_INT, AT(hyper.warmup), C_TRAIN, NULL, 0, 1e9, .arg = "N", .help = "steps of linear learning-rate warmup"},
    {"--grad-clip", OPT_FLOAT, AT(hyper.grad_clip), C_TRAIN, NULL, 1e-9, 1e9, .arg = "X", .help = "the gradient's global norm is clipped at X"},
    {"--ema-decay", OPT_FLOAT, AT(hyper.ema_decay), C_TRAIN, NULL, 0, 1, .arg = "X", .help = "the EMA's decay (section 9)"},
    {"--no-flip", OPT_OFF, AT(hyper.flips), C_TRAIN, .help = "no random horizontal flips"},
    {"--schedule", OPT_WORD, AT(schedule), C_TRAIN | C_SCHEDULE | C_IMPORT, "linear", .arg = "linear|cosine",
     .help = "the beta schedule (linear is the paper's)", .words = SCHEDULE_NAMES},
    {"--mean-type", OPT_WORD, AT(obj.mean), C_TRAIN | C_MODEL | C_IMPORT, NULL, .arg = "eps|mu|x0",
     .help = "what the network predicts (Eq. 11's eps; Table 2's rows)", .words = MEAN_NAMES},
    {"--var-type", OPT_WORD, AT(obj.var), C_TRAIN | C_MODEL | C_IMPORT, NULL, .arg = "fixedlarge|fixedsmall|learned",
     .help = "sigma_t^2 = beta_t, beta_tilde_t, or learned", .words = VAR_NAMES},
    {"--loss", OPT_WORD, AT(obj.loss), C_TRAIN | C_MODEL | C_IMPORT, NULL, .arg = "simple|mse|kl",
     .help = "Eq. (14), MSE on the prediction, or the true bound L (all three are stored in the "
             "checkpoint; sample, bpd and --resume read them from there)", .words = LOSS_NAMES},
    HEADING("network (override the preset):"),
    {"--ch", OPT_INT, AT(ch), C_NET, NULL, 1, 4096, .arg = "N", .help = "base channels"},
    {"--ch-mult", OPT_LIST, AT(ch_mult), C_NET, NULL, 1, 4096, .arg = "1,2,2", .help = "channels per level, times --ch",
     .count_at = AT(n_mult), .max_count = MAX_LEVELS},
    {"--num-res-blocks", OPT_INT, AT(num_res_blocks), C_NET, NULL, 1, 64, .arg = "N", .help = "ResBlocks per level"},
    {"--attn", OPT_LIST, AT(attn_res), C_NET, NULL, 1, 4096, .arg = "16|none", .help = "resolutions with self-attention",
     .count_at = AT(n_attn), .max_count = MAX_LEVELS, .none = 1},
    {"--groups", OPT_INT, AT(groups), C_NET, NULL, 1, 4096, .arg = "N", .help = "GroupNorm groups"},
    {"--dropout", OPT_FLOAT, AT(dropout), C_NET, NULL, 0, 0.999, .arg = "P", .help = "dropout in the ResBlocks"},
    {"--in-ch", OPT_INT, AT(in_ch), C_NET, NULL, 1, 16, .arg = "N", .help =
     "image channels (default: the dataset's; a folder's: 1 if every picture is grey, else 3)"},
    HEADING("sampling and evaluation:"),
    {"--checkpoint", OPT_STR, AT(checkpoint), C_MODEL | C_EXPORT, NULL, .arg = "PATH",
     .help = "a checkpoint written by training"},
    {"-n", OPT_INT, AT(n), C_SAMPLE, "64", 1, 100000, .arg = "N", .help = "sample: images"},
    {"-n", OPT_INT, AT(n), C_BPD, "32", 1, 100000, .arg = "N", .help = "bpd: test images"},
    {"--steps", OPT_LONG, AT(steps), C_SAMPLE | C_BPD, "1000", 0, 1e9, .arg = "K", .help =
     "sample, bpd: a chain of K steps (sample: DPM-Solver++ to 50; 10.2)"},
    {"--sigma", OPT_WORD, AT(sampler.var), C_TRAIN | C_MODEL, "beta", .arg = "beta|beta_tilde",
     .help = "sigma_t^2 of §3.2, for a fixed variance", .words = SIGMA_NAMES},
    {"--sampler", OPT_WORD, AT(sampler.kind), C_SAMPLE, "ddpm", .arg = "ddpm|ddim|dpm++",
     .help = "sample: Alg. 2, DDIM, DPM-Solver++ (section 10.2)", .words = SAMPLER_NAMES},
    {"--eta", OPT_DOUBLE, AT(sampler.eta), C_SAMPLE, "0", 0, 1, .arg = "E", .help = "sample: DDIM's eta"},
    {"--trace", OPT_ON, AT(trace), C_SAMPLE, .help = "sample: also x_t and x0_hat along the chain (Fig. 6; .npy + PNG)"},
    {"--npz", OPT_STR, AT(npz), C_SAMPLE, NULL, .arg = "FILE",
     .help = "sample: also the samples as arr_0, uint8 N x H x W x C (FID tools)"},
    {"--per-t", OPT_STR, AT(per_t), C_BPD, NULL, .arg = "FILE.csv",
     .help = "bpd: every term, the rate and the distortion per t (Table 4)"},
    {"--t-samples", OPT_INT, AT(t_samples), C_BPD, NULL, 1, 1e6, .arg = "K", .help =
     "bpd: the sum over t estimated from K stratified t per image (unbiased; about T/K times faster; "
     "the std. error covers it)"},
    {"--index", OPT_LIST, AT(index), C_DECODE, NULL, 0, 1e6, .arg = "I|A,B", .help =
     "reconstruct: test image I; interpolate: test images A and B", .count_at = AT(n_index), .max_count = 2},
    {"--t", OPT_LIST, AT(tlist), C_RECONSTRUCT, "1000,750,500,250", 1, 4096, .arg = "T,...", .help = "reconstruct: the steps",
     .count_at = AT(n_tlist), .max_count = 64},
    {"--t", OPT_LIST, AT(tlist), C_INTERPOLATE, "500", 1, 4096, .arg = "T,...", .help = "interpolate: the steps",
     .count_at = AT(n_tlist), .max_count = 64},
    {"-k", OPT_INT, AT(k), C_RECONSTRUCT, "4", 1, 64, .arg = "N", .help = "reconstruct: decodings per step"},
    {"--lambdas", OPT_INT, AT(lambdas), C_INTERPOLATE, "9", 2, 64, .arg = "N", .help = "interpolate: evenly spaced lambda in [0, 1]"},
    {"--out", OPT_STR, AT(out), C_SAMPLE | C_DECODE, NULL, .arg = "PATH",
     .help = "the PNG grid (default: beside the checkpoint), with .npy files beside it"},
    {"--out", OPT_STR, AT(out), C_EXPORT | C_IMPORT, NULL, .arg = "PATH",
     .help = "export: the exchange file to write; import: the checkpoint to write"},
    {"--weights", OPT_STR, AT(weights), C_IMPORT, NULL, .arg = "FILE.ref", .help = "import: the exchange file to read"},
    HEADING("other:"),
    {"--seed", OPT_LONG, AT(seed), C_TRAIN | C_MODEL | C_IMPORT, "1", 0, 9.2e18, .arg = "S", .help = "the one RNG's seed"},
    {"--threads", OPT_INT, AT(threads), ~0u, NULL, 1, MAX_THREADS, .arg = "N", .help = "OpenMP threads (default: all cores)"},
    {"--help", OPT_ON, 0, ~0u, .help = "this text (also -h)"},
};
#define N_OPTIONS (int)(sizeof OPTIONS / sizeof OPTIONS[0])
_Static_assert(N_OPTIONS <= 96, "Options.given has room for 96 options");

// The flags' names for the model's refusals (sections 5 and 15 name the fields).
static const ConfigWords CONFIG_FLAGS = {"--in-ch", "--ch", "--ch-mult", "--num-res-blocks", "--attn",
                                         "--groups", "--dropout"};
static const ObjectiveWords OBJECTIVE_FLAGS = {"--mean-type", "--var-type", "--loss"};

// A bad flag or value: exit code 2, as command-line tools do.
static void usage_error(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fail_v(2, " (see ./ddpm --help)", fmt, ap);
}

// Was the option NAME on the command line (for this command)?
static int given(const Options* o, const char* name) {
    for (int i = 0; i < N_OPTIONS; i++)
        if (o->given[i] && !strcmp(OPTIONS[i].name, name)) return 1;
    return 0;
}

static int word_index(const char* const* words, const char* v) {
    for (int i = 0; words[i]; i++)
        if (!strcmp(words[i], v)) return i;
    return -1;
}

// Stores the value v of option p in o, or refuses it in one line (exit 2).
static void option_set(Options* o, const Option* p, const char* v) {
    char* field = (char*)o + p->at;
    char* end;
    errno = 0;
    if (p->type == OPT_INT || p->type == OPT_LONG) {
        long x = strtol(v, &end, 10);
        if (errno || *end || end == v || x < p->lo || x > p->hi)
            usage_error("%s %s: expected a whole number from %.0f to %.0f", p->name, v, p->lo, p->hi);
        if (p->type == OPT_INT) *(int*)field = (int)x;
        else *(long*)field = x;
    } else if (p->type == OPT_FLOAT || p->type == OPT_DOUBLE) {
        double x = strtod(v, &end);
        if (errno || *end || end == v || !(x >= p->lo && x <= p->hi))
            usage_error("%s %s: expected a number from %g to %g", p->name, v, p->lo, p->hi);
        if (p->type == OPT_FLOAT) *(float*)field = (float)x;
        else *(double*)field = x;
    } else if (p->type == OPT_STR) {
        if (!*v) usage_error("%s: an empty value; pass a path or a name", p->name);
        if (p->words && word_index(p->words, v) < 0)
            usage_error("%s %s: expected %s", p->name, v, p->arg);
        *(const char**)field = v;
    } else if (p->type == OPT_WORD) {
        int i = word_index(p->words, v);
        if (i < 0) usage_error("%s %s: expected %s", p->name, v, p->arg);
        *(int*)field = i;
    } else if (p->type == OPT_LIST) {
        int* count = (int*)((char*)o + p->count_at);
        if (p->none && !strcmp(v, "none")) { *count = -1; return; }
        int n = 0;
        for (const char* s = v;; s = end + 1) {
            long x = strtol(s, &end, 10);
            if (errno || end == s || x < p->lo || x > p->hi || n == p->max_count || (*end && *end != ',') ||
                (*end == ',' && !end[1]))
                usage_error("%s %s: expected 1 to %d whole numbers from %.0f to %.0f, separated by commas",
                            p->name, v, p->max_count, p->lo, p->hi);
            ((int*)field)[n++] = (int)x;
            if (!*end) break;
        }
        *count = n;
    }
}

// ---- 22.2 The commands ----

// The network configuration: the preset, the dataset's channels, then any overrides.
// data_ch: the dataset's channels (0 before it is read: the preset's, or --in-ch).
static Config options_config(const Options* o, int data_ch) {
    Config c;
    int found = preset_find(o->model, o->img, &c);
    if (!found) usage_error("--model %s: unknown preset; presets are tiny, small, paper, paper256", o->model);
    if (found < 0) {
        preset_find(o->model, 0, &c);
        usage_error("--model %s is the paper's %dx%d network; at --img %d use tiny or small, or give "
                    "--ch-mult with a level per doubling", o->model, c.img, c.img, o->img);
    }
    if (!strcmp(o->data, "fashion-mnist")) c.in_ch = 1;
    if (data_ch > 0) c.in_ch = data_ch;
    if (o->in_ch > 0) c.in_ch = o->in_ch;
    if (o->ch > 0) c.ch = o->ch;
    if (o->n_mult > 0) { c.n_levels = o->n_mult; memcpy(c.ch_mult, o->ch_mult, sizeof c.ch_mult); }
    if (o->num_res_blocks > 0) c.num_res_blocks = o->num_res_blocks;
    if (o->n_attn > 0) { c.n_attn = o->n_attn; memcpy(c.attn_res, o->attn_res, sizeof c.attn_res); }
    if (o->n_attn < 0) c.n_attn = 0;
    if (o->groups > 0) c.groups = o->groups;
    if (o->dropout >= 0) c.dropout = o->dropout;
    c.learn_sigma = o->obj.var == VAR_LEARNED;
    const char* err = config_check(&c, &CONFIG_FLAGS);
    if (err) usage_error("%s", err);
    return c;
}

// A --mean-type, --var-type or --loss that contradicts what the checkpoint was trained
// with is refused: the checkpoint decides.
static void check_objective_flags(const Options* o, const Objective* ob, const char* path) {
    if (given(o, "--mean-type") && o->obj.mean != ob->mean)
        usage_error("%s was trained with --mean-type %s; drop --mean-type", path, MEAN_NAMES[ob->mean]);
    if (given(o, "--var-type") && o->obj.var != ob->var)
        usage_error("%s was trained with --var-type %s; drop --var-type", path, VAR_NAMES[ob->var]);
    if (given(o, "--loss") && o->obj.loss != ob->loss)
        usage_error("%s was trained with --loss %s; drop --loss", path, LOSS_NAMES[ob->loss]);
}

// The grids of a training run, with the EMA weights; the live parameters wait in the
// gradient buffer, free between steps, and the samplers' own RNGs leave the training stream
// untouched: previews change none of the run's bits. A preview is DPM-Solver++ (10.2) in
// PREVIEW_STEPS steps from one fixed x_T, so the first row of each, added to progress.png,
// shows the same samples as training goes; the run's last grid is also Algorithm 2's. 10
// steps: the fewest whose FID-FMNIST matched DDIM's in 50 (notebooks/README.md).
#define PREVIEW_STEPS 10
#define PREVIEW_NAME "DPM-Solver++"
#define FILM_SEED 0x66696c6dULL   // "film": x_T of every preview

// Is step a preview's? N, 2N, 4N, ... below --sample-every (N: --first-preview), then
// every multiple of it.
static int preview_due(uint64_t step, long first, long every) {
    if (step % (uint64_t)every == 0) return 1;
    for (uint64_t s = (uint64_t)first; first > 0 && s < (uint64_t)every; s *= 2)
        if (s == step) return 1;
    return 0;
}

// One grid into imgs: returns 1 if written, 0 if the chain was stopped or left the finite range.
static int training_grid(UNet* m, const Schedule* s, const Sampler* sp, float* imgs, int n, Rng* rng,
                         const char* what, const char* path, unsigned long long step) {
    Progress pg;
    const Watch* w = progress_start(&pg, what, (long)(n + m->B_max - 1) / m->B_max * s->T, 1, NULL);
    int done = p_sample_loop(m, s, sp, imgs, n, rng, w);
    if (pg.t_bad)
        fprintf(stderr, "samples: none written at step %llu: the chain left the finite range at t = %d\n", step,
                pg.t_bad);
    if (!done) return 0;
    int cols = (int)ceil(sqrt((double)n));
    if (save_grid_png(path, imgs, n, m->cfg.in_ch, m->cfg.img, m->cfg.img, cols) == 0)
        fprintf(stderr, "samples: %s\n", path);
    return 1;
}

static unsigned long long film_stopped;   // the step whose row the film could not take, or 0

static void training_samples(Trainer* tr, const Options* o, const char* dir, int final) {
    if (o->sample_n <= 0) return;
    UNet* m = &tr->net;
    size_t n = (size_t)m->cfg.in_ch * m->cfg.img * m->cfg.img, nb = m->n_params * sizeof(float);
    unsigned long long step = tr->step;
    float* imgs = malloc_check((size_t)o->sample_n * n * sizeof(float), "sample images");
    memcpy(m->grads, m->params, nb);
    memcpy(m->params, tr->ema, nb);
    char path[4200], film[4200], what[64];
    Schedule fast;
    schedule_respace(&fast, &tr->sched, PREVIEW_STEPS < tr->sched.T ? PREVIEW_STEPS : tr->sched.T, 1);
    Sampler preview = {tr->obj.mean, tr->obj.var, SAMPLER_DPM, 0.0};
    Rng rng;
    rng_seed(&rng, FILM_SEED);
    snprintf(what, sizeof what, "preview (%s, %d steps): step", PREVIEW_NAME, fast.T);
    snprintf(path, sizeof path, "%s/samples_%07llu_dpm%d.png", dir, step, fast.T);
    snprintf(film, sizeof film, "%s/progress.png", dir);   // the grid's first row
    if (training_grid(m, &fast, &preview, imgs, o->sample_n, &rng, what, path, step) && !film_stopped &&
        film_append(film, imgs, (int)ceil(sqrt((double)o->sample_n)), m->cfg.in_ch, m->cfg.img, m->cfg.img, step))
        film_stopped = step;   // said once (above), and again at the end of the run
    schedule_free(&fast);
    if (final && !stop_requested) {
        Sampler sp = {tr->obj.mean, given(o, "--sigma") ? o->sampler.var : tr->obj.var, SAMPLER_ALG2, 0};
        rng_seed(&rng, o->seed ^ (0x5851f42d4c957f2dULL * (step + 1)));
        snprintf(path, sizeof path, "%s/samples_%07llu.png", dir, step);
        training_grid(m, &tr->sched, &sp, imgs, o->sample_n, &rng, "sampling (Algorithm 2): step", path, step);
    }
    memcpy(m->params, m->grads, nb);
    free(imgs);
}

static void save_or_die(Trainer* tr, const Options* o, const char* path) {
    char err[4400];
    if (checkpoint_save(tr, (ScheduleKind)o->schedule, path, err, sizeof err) != 0) die("%s", err);
    fprintf(stderr, "checkpoint: %s (step %llu)\n", path, (unsigned long long)tr->step);
}

// On --resume, drop the log rows of steps after the checkpoint (written before a crash,
// a failed save or a non-finite loss): they are about to be taken again.
// Only whole rows are kept: a row torn by a kill (no newline, or fewer than five fields)
// would otherwise be glued to the next one written.
static void log_trim(const char* path, uint64_t step) {
    if (access(path, F_OK) != 0 && errno == ENOENT) return;
    FILE* in = fdopen(open_run_file(path, O_RDONLY), "r");
    if (!in) return;
    char line[512], err[4400];
    AtomicFile af;
    FILE* out = atomic_open(&af, path, err, sizeof err);
    if (!out) die("%s; check that the run folder is writable", err);
    int ok = 1, first = 1;
    while (fgets(line, sizeof line, in)) {
        unsigned long long s;
        float f[4];
        char end;
        int whole = strchr(line, '\n') != NULL;
        if (first && whole && !strncmp(line, "step,", 5)) ok &= fputs(line, out) >= 0;   // the header
        else if (whole && sscanf(line, "%llu,%f,%f,%f,%f%c", &s, f, f + 1, f + 2, f + 3, &end) == 6 &&
                 end == '\n' && s <= step)
            ok &= fputs(line, out) >= 0;
        first = 0;
    }
    fclose(in);
    if (atomic_commit(&af, ok, err, sizeof err) != 0) die("%s", err);
}

// One training run per run folder: an exclusive lock on DIR/lock, held until exit,
// with the holder's PID in it for the message the next one gets.
static void lock_run_folder(const char* dir) {
    char path[4200], pid[32] = "";
    snprintf(path, sizeof path, "%s/lock", dir);
    int fd = open_run_file(path, O_RDWR | O_CREAT);
    if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
        ssize_t k = read(fd, pid, sizeof pid - 1);
        pid[k > 0 ? k : 0] = 0;
        pid[strcspn(pid, "\n")] = 0;
        die("%s is in use by another training run (PID %s); wait for it to finish, or pass another --run",
            dir, pid[0] ? pid : "unknown");
    }
    int n = snprintf(pid, sizeof pid, "%ld\n", (long)getpid());
    if (ftruncate(fd, 0) != 0 || write(fd, pid, n) != n) die("cannot write %s: %s", path, strerror(errno));
    struct stat st;   // the film is the run folder's too: a link, FIFO or folder there is refused now
    snprintf(path, sizeof path, "%s/progress.png", dir);
    if (lstat(path, &st) == 0) close(open_run_file(path, O_RDONLY | O_NONBLOCK));
}

// Is --data a folder of pictures, rather than a dataset's name?
static int data_is_folder(const Options* o) { return word_index(DATA_NAMES, o->data) < 0; }

// The dataset --data names (train: its training set), or the folder it names, decoded at
// side img with in_ch channels (0: as the folder's pictures are).
static void data_load(Dataset* d, const Options* o, int train, int img, int in_ch, int at_least) {
    if (data_is_folder(o)) {
        FolderSpec fs = {o->data, o->data_dir, img, in_ch, o->background, o->skip_bad, train, at_least};
        folder_load(d, &fs);
    } else {
        dataset_load(d, o->data, o->data_dir, train);
    }
}

// What a run is called: the dataset, or the folder's name and its side.
static void data_name(char* out, size_t len, const Options* o) {
    if (!data_is_folder(o)) { snprintf(out, len, "%s", o->data); return; }
    size_t n = strlen(o->data);
    while (n > 1 && o->data[n - 1] == '/') n--;
    const char* base = o->data + n;
    while (base > o->data && base[-1] != '/') base--;
    snprintf(out, len, "%.*s-%dpx", (int)(o->data + n - base), base, o->img);
}

// "1 h 05 min", "14 min", "40 s"
static const char* duration(double sec) {
    static char s[2][32];
    static int which;
    char* d = s[which ^= 1];
    long m = lround(sec / 60);
    if (sec < 90) snprintf(d, sizeof s[0], "%.0f s", sec);
    else if (m < 60) snprintf(d, sizeof s[0], "%ld min", m);
    else snprintf(d, sizeof s[0], "%ld h %02ld min", m / 60, m % 60);
    return d;
}

// The run's first line: what it will do, and where the length came from.
static void print_plan(const Options* o, const Dataset* data, const Trainer* tr, const char* dir) {
    char when[384] = "";
    int k = 0;
    if (o->sample_n > 0) {
        k = snprintf(when, sizeof when, "; preview grids (%s, %d steps) ", PREVIEW_NAME, PREVIEW_STEPS);
        int listed = 0;
        for (long s = o->first_preview; s > 0 && s < o->sample_every && k < 200; s *= 2, listed++)
            k += snprintf(when + k, sizeof when - k, "%s%ld", listed ? ", " : "at steps ", s);
        snprintf(when + k, sizeof when - k, "%severy %d steps; Algorithm 2's grid at the end%s", listed ? ", then " : "",
                 o->sample_every, o->minutes > 0 ? " if it takes at most a quarter of --minutes, else the last preview" : "");
    }
    fprintf(stderr, "plan: train %s (%zu parameters) on %s (%d images, %dx%d, %d channels) for %ld steps of batch %d "
            "at lr %g (%s), from step %llu%s; %d threads, run %s\n", o->model, tr->net.n_params, o->data, data->N,
            tr->net.cfg.img, tr->net.cfg.img, tr->net.cfg.in_ch, o->steps, o->batch, tr->hyper.lr,
            given(o, "--steps") ? "--steps" : "the preset's default run; --steps N or --minutes M to change it",
            (unsigned long long)tr->step, when, max_threads(), dir);
}

// --minutes M is the whole run's time, its last grid included: training stops where the
// last grid's estimate would take the run past M. That grid is Algorithm 2's where it
// takes at most a quarter of M, else the last preview is the last grid (its file names
// its sampler). The estimate: a sampling step of one image takes about 0.4 of a training
// step's time per image (tiny on one core of an Intel Xeon: 7.0 ms and 18 ms).
static double grid_seconds(const Options* o, double sec_per_step, int steps) {
    return 0.4 * sec_per_step / (o->batch / world_size) * o->sample_n * steps;
}

static int last_grid_is_preview(const Options* o, const Trainer* tr, double sec_per_step) {
    return o->minutes > 0 && o->sample_n > 0 && grid_seconds(o, sec_per_step, tr->sched.T) > 15 * o->minutes;
}

static double last_grid_seconds(const Options* o, const Trainer* tr, double sec_per_step) {
    int preview = last_grid_is_preview(o, tr, sec_per_step);
    return o->sample_n > 0 ? grid_seconds(o, sec_per_step, preview ? PREVIEW_STEPS : tr->sched.T) : 0;
}

// After the first steps: how long the plan will take at the speed measured.
static void print_plan_time(const Options* o, const Trainer* tr, uint64_t step, double sec_per_step, long steps_timed) {
    double left = sec_per_step * (o->steps - (long)step);
    fprintf(stderr, "time: %.2f s a training step (the mean of %ld), so about %s for the %ld steps left, "
            "and the grids", sec_per_step, steps_timed,
            duration(left), o->steps - (long)step);
    double train_s = 60 * o->minutes - last_grid_seconds(o, tr, sec_per_step);
    if (o->minutes > 0 && train_s < left)
        fprintf(stderr, "; --minutes %g ends it first, near step %ld", o->minutes,
                (long)step + (long)(fmax(train_s, 0) / sec_per_step));
    if (last_grid_is_preview(o, tr, sec_per_step))
        fprintf(stderr, "; the last grid will be the last preview (%s, %d steps): Algorithm 2's would take about %s, "
                "over a quarter of --minutes", PREVIEW_NAME, PREVIEW_STEPS, duration(grid_seconds(o, sec_per_step, tr->sched.T)));
    fprintf(stderr, "\n");
}

// The batch's slice (per rank, per micro-batch) must fit in memory; if it does not, the
// line names the --accumulate that would fit (section 9: the same step, in slices).
static void check_training_memory(const Options* o, const Config* cfg) {
    int per_rank = o->batch / world_size, K = o->accumulate;
    double have = memory_available_gib(), need = network_gib(cfg, per_rank / K, 1);
    if (have < 0 || need <= have) return;
    char fix[256];
    int k = K;
    while (++k <= per_rank && (per_rank % k || network_gib(cfg, per_rank / k, 1) > have)) {}
    if (k <= per_rank)
        snprintf(fix, sizeof fix, "pass --accumulate %d (%d micro-batches of %d images, about %.1f GiB)", k, k,
                 per_rank / k, network_gib(cfg, per_rank / k, 1));
    else
        snprintf(fix, sizeof fix, "even one image at a time does not fit: close other programs, or pass a smaller "
                 "--img, --ch or --model");
    die_memory(cfg, per_rank / K, need, have, fix);
}

// A training run's watcher (Algorithm 1's, section 9), on every rank: the log row and the
// progress line of each step, the time estimate after ten, previews and checkpoints, and
// the stop at Ctrl-C or at --minutes. Rank 0 (lead) alone writes the run folder.
typedef struct {
    const Options* o;
    Trainer* tr;
    Dataset* data;
    FILE* log;
    const char *dir, *ckpt;
    int lead, tty, exists;             // exists: the run folder held a checkpoint at the start
    int saved, out_of_time, stop;
    uint64_t first, last_saved;        // the run's first step; the step model.ckpt holds
    Rng rng;                           // the RNG before the step under way (section 18's SIGBUS)
    double t0, last, ts, running, t_timed;   // ts: when the step began; last: the last progress line
} TrainRun;

static int train_run_step(void* ctx, const StepStats* st) {
    TrainRun* r = ctx;
    const Options* o = r->o;
    Trainer* tr = r->tr;
    dataset_forget(r->data);
    if (!isfinite(st->loss)) {   // nothing was updated or saved; say what will work
        const char* v = isnan(st->loss) ? "nan" : "inf";
        unsigned long long bad = tr->step + 1;
        if (!r->exists && !r->saved)
            die("the loss became %s at step %llu, before any checkpoint; start again with a lower --lr", v, bad);
        if (r->last_saved + 1 == tr->step + 1)   // the forward pass from that very state overflowed
            die("the loss became %s at step %llu; %s holds step %llu, and resuming it replays the batch that "
                "overflowed, at any --lr: start a new run (--run DIR) with a lower --lr", v, bad, r->ckpt,
                (unsigned long long)r->last_saved);
        die("the loss became %s at step %llu; %s (step %llu) is the last saved state: resume it with a lower "
            "--lr (--resume --lr X)", v, bad, r->ckpt, (unsigned long long)r->last_saved);
    }
    double now = now_seconds(), ips = o->batch / (now - r->ts);
    if (tr->step > r->first + 1) r->t_timed += now - r->ts;   // the first step warms up: not timed
    if (r->lead && tr->step == r->first + 11 && (long)tr->step < o->steps) print_plan_time(o, tr, tr->step, r->t_timed / 10, 10);
    r->running = r->running < 0 ? st->loss : 0.98 * r->running + 0.02 * st->loss;
    fprintf(r->log, "%llu,%.6f,%.6g,%.6f,%.2f\n", (unsigned long long)tr->step, st->loss, st->lr, st->grad_norm, ips);
    double el = now - r->t0, eta = el / (tr->step - r->first) * (o->steps - tr->step);
    if (r->tty && (now - r->last > 0.25 || (long)tr->step == o->steps)) {
        fprintf(stderr, "\rstep %llu/%ld | loss %.4f | %.1f img/s | %02d:%02d:%02d elapsed | ETA %02d:%02d:%02d   ",
                (unsigned long long)tr->step, o->steps, r->running, (tr->step - r->first) * o->batch / el,
                (int)el / 3600, (int)el / 60 % 60, (int)el % 60, (int)eta / 3600, (int)eta / 60 % 60, (int)eta % 60);
        r->last = now;
    } else if (r->lead && !r->tty && (tr->step % o->log_every == 0 || (long)tr->step == o->steps)) {
        fprintf(stderr, "step %llu/%ld loss %.4f (running %.4f) lr %.3g grad_norm %.3f %.1f img/s elapsed %.0fs ETA %.0fs\n",
                (unsigned long long)tr->step, o->steps, st->loss, r->running, st->lr, st->grad_norm,
                (tr->step - r->first) * o->batch / el, el, eta);
    }
    // every rank stops at the same step: at a signal any rank got, or rank 0's clock
    double sec = tr->step > r->first + 1 ? r->t_timed / (tr->step - r->first - 1) : now - r->t0;
    r->out_of_time = world_max(r->lead && o->minutes > 0 && now - r->t0 + last_grid_seconds(o, tr, sec) > 60 * o->minutes);
    r->stop = world_max(stop_requested);
    int final = (long)tr->step == o->steps || r->out_of_time;
    if (final || preview_due(tr->step, o->first_preview, o->sample_every)) {
        if (r->tty) fprintf(stderr, "\n");
        fflush(r->log);
        int alg2 = final && !last_grid_is_preview(o, tr, sec);
        if (r->lead) save_or_die(tr, o, r->ckpt), training_samples(tr, o, r->dir, alg2);
        if (r->lead && final && !alg2 && o->sample_n > 0)
            fprintf(stderr, "samples: the last grid is the preview's (%s, %d steps): Algorithm 2's would take about %s, "
                    "over a quarter of --minutes; ./ddpm sample --checkpoint %s draws it\n", PREVIEW_NAME, PREVIEW_STEPS,
                    duration(grid_seconds(o, sec, tr->sched.T)), r->ckpt);
        r->saved = 1;
        r->last_saved = tr->step;
    }
    r->ts = now_seconds();
    r->rng = tr->rng;
    return !r->stop && !r->out_of_time;
}

// --resume continues the checkpoint's network, schedule and batch; other flags are refused.
// Before the data is read a folder's channels are not known: they are taken as the
// checkpoint's, and checked when it has been read.
static void check_resume(const Options* o, const CheckpointHeader* hd, Config c, int data_read, const char* ckpt) {
    Config saved = config_from_header(hd);
    if (!data_read && data_is_folder(o) && !given(o, "--in-ch")) c.in_ch = saved.in_ch;
    if (memcmp(&saved, &c, sizeof c))
        usage_error("%s was trained with another network; resume with the same --data, --img, --model and network "
                    "flags", ckpt);
    if (hd->schedule != (int)o->schedule) usage_error("%s was trained with another --schedule", ckpt);
    // Same seed and flags, same bits: that holds only at the batch the run began with.
    // --accumulate may change: its K micro-batches take the same step, to float rounding.
    if (hd->batch != o->batch)
        usage_error("%s was trained with --batch %d; resume with --batch %d", ckpt, hd->batch, hd->batch);
}

static int cmd_train(const Options* flags) {
    Options run = *flags;   // the flags, with --resume's batch
    const Options* o = &run;
    Config cfg = options_config(o, 0);
    char dir[4096], ckpt[4200], logp[4200], name[512];
    data_name(name, sizeof name, o);
    if (o->run_dir) snprintf(dir, sizeof dir, "%s", o->run_dir);
    else snprintf(dir, sizeof dir, "runs/%s-%s", name, o->model);
    snprintf(ckpt, sizeof ckpt, "%s/model.ckpt", dir);
    snprintf(logp, sizeof logp, "%s/log.csv", dir);
    int exists = file_size(ckpt) >= 0;
    if (exists && !o->resume)
        usage_error("%s already holds a checkpoint; add --resume to continue it, or --run DIR for a new run", dir);
    if (!exists && o->resume) usage_error("--resume: no checkpoint at %s; drop --resume to start a new run", ckpt);
    // The objective: the flags', or on --resume the checkpoint's (flags may only agree with it).
    Objective ob = o->obj;
    CheckpointHeader hd;
    if (o->resume) {
        fclose(checkpoint_open(ckpt, &hd));
        if (!given(o, "--batch")) run.batch = hd.batch;
        ob = objective_from_header(&hd);
        check_objective_flags(o, &ob, ckpt);
    }
    const char* why = objective_check(&ob, &OBJECTIVE_FLAGS);
    if (why) usage_error("%s", why);
    if (ob.var == VAR_LEARNED && given(o, "--sigma"))
        usage_error("--sigma applies to a fixed variance; --var-type learned learns Sigma_theta");
    if (o->batch % (world_size * o->accumulate))
        usage_error("--batch %d does not split into %d equal slices (%d ranks x --accumulate %d); pass a multiple of %d",
                    o->batch, world_size * o->accumulate, world_size, o->accumulate, world_size * o->accumulate);
    cfg.learn_sigma = ob.var == VAR_LEARNED;
    if (o->resume) check_resume(o, &hd, cfg, 0, ckpt);   // before anything is built: a mistake costs nothing
    check_training_memory(o, &cfg);
    Dataset data;
    data_load(&data, o, 1, cfg.img, given(o, "--in-ch") ? o->in_ch : 0, o->batch);
    if (!given(o, "--in-ch")) cfg = options_config(o, data.C), cfg.learn_sigma = ob.var == VAR_LEARNED;
    if (data.C != cfg.in_ch) die("--in-ch %d does not match %s's %d channels", cfg.in_ch, o->data, data.C);
    if (data.N < o->batch)
        die("--data %s holds %d pictures, fewer than --batch %d; add pictures or pass a smaller --batch", o->data,
            data.N, o->batch);
    if (o->resume) check_resume(o, &hd, cfg, 1, ckpt);   // again, with the data's channels
    int lead = world_rank == 0;   // rank 0 alone writes the run folder (section 23)
    if (lead) mkdir_p(dir), lock_run_folder(dir);
    Trainer tr;
    trainer_init(&tr, &cfg, &ob, o->batch, o->accumulate, (ScheduleKind)o->schedule, &o->hyper, (uint64_t)o->seed);
    if (o->resume) {
        checkpoint_load(&tr, ckpt);
        if (lead) log_trim(logp, tr.step);
        if (lead) fprintf(stderr, "resumed %s at step %llu\n", ckpt, (unsigned long long)tr.step);
        if (lead) fprintf(stderr, "(the RNG continues from the checkpoint, so --seed is not used; --lr, --warmup, "
                "--grad-clip, --ema-decay and --no-flip apply as given from here on)\n");
    }
    FILE* log = lead ? fdopen(open_run_file(logp, O_WRONLY | O_CREAT | (o->resume ? O_APPEND : O_TRUNC)),
                              o->resume ? "a" : "w")
                     : fopen_check("/dev/null", "w", NULL);
    if (!log) die("cannot open %s: %s", logp, strerror(errno));
    setvbuf(log, NULL, _IOLBF, 0);   // each row reaches the file in one write: a kill cannot tear one
    if (!o->resume) fprintf(log, "step,loss,lr,grad_norm,images_per_s\n");
    install_signal_handlers();
    if (lead) print_plan(o, &data, &tr, dir);
    if (lead && o->accumulate > 1)
        fprintf(stderr, "%d micro-batches of %d images a step (--accumulate)\n", o->accumulate,
                o->batch / world_size / o->accumulate);
    if (lead && world_size > 1)
        fprintf(stderr, "data parallel over %d ranks: %d images each (section 23)\n", world_size, o->batch / world_size);
    Objective usual = PAPER_OBJECTIVE;   // the paper's, with the variance its preset samples with
    const Preset* plan = preset_named(o->model);
    if (plan) usual.var = plan->var;
    if (lead && memcmp(&ob, &usual, sizeof ob))
        fprintf(stderr, "objective (Table 2): --mean-type %s --var-type %s --loss %s\n", MEAN_NAMES[ob.mean],
                VAR_NAMES[ob.var], LOSS_NAMES[ob.loss]);
    double t0 = now_seconds();
    TrainRun r = {.o = o, .tr = &tr, .data = &data, .log = log, .dir = dir, .ckpt = ckpt, .lead = lead,
                  .tty = lead && isatty(2), .exists = exists, .first = tr.step, .last_saved = tr.step,
                  .t0 = t0, .last = t0, .ts = t0, .running = -1, .stop = world_max(stop_requested), .rng = tr.rng};
    sigjmp_buf fault;
    if (sigsetjmp(fault, 1)) {   // the cache was cut short under a batch: that step is not taken
        tr.rng = r.rng;
        if (lead) save_or_die(&tr, o, ckpt);
        die("%s was cut short while the run read it (another process truncated it); continue with the same "
            "command plus --resume, which decodes the folder anew", cache_map.path);
    }
    cache_fault = &fault;
    if (!r.stop) train(&tr, &data, (uint64_t)o->steps, &(TrainWatch){train_run_step, &r});
    cache_fault = NULL;
    if (r.tty) fprintf(stderr, "\n");
    fclose(log);
    if (film_stopped) fprintf(stderr, "note: the film %s/progress.png stopped at step %llu: it could not be written "
                              "(see above)\n", dir, film_stopped);
    if (r.stop) {
        if (lead) save_or_die(&tr, o, ckpt);
        if (lead) fprintf(stderr, "interrupted at step %llu; continue with the same command plus --resume\n",
                          (unsigned long long)tr.step);
        trainer_free(&tr); dataset_free(&data);
        return 128 + r.stop;   // as a shell reports a process the signal ended: 130, 143
    } else if (lead && r.out_of_time) {
        fprintf(stderr, "--minutes %g reached at step %llu; continue with the same command plus --resume\n",
                o->minutes, (unsigned long long)tr.step);
    } else if (lead && tr.step == r.first) {
        fprintf(stderr, "nothing to do: the run is at step %llu of --steps %ld\n", (unsigned long long)tr.step, o->steps);
    }
    trainer_free(&tr); dataset_free(&data);
    return 0;
}

// Builds a network from a checkpoint with its EMA weights (what sampling and evaluation
// use) and the noise schedule it was trained with.
static void default_beside(char* out, size_t len, const char* ckpt, const char* name) {
    const char* slash = strrchr(ckpt, '/');
    if (slash) snprintf(out, len, "%.*s/%s", (int)(slash - ckpt), ckpt, name);
    else snprintf(out, len, "%s", name);
}

// The output grid: --out, or NAME beside the checkpoint; checked before any long work.
// base gets the path without its extension, for the .npy files written beside it.
static void output_paths(const Options* o, const char* name, char* out, char* base, size_t len) {
    const char* flag = o->out ? "--out" : "the output grid";
    if (o->out) snprintf(out, len, "%s", o->out);
    else default_beside(out, len, o->checkpoint, name);
    check_output_path(out, flag, o->checkpoint);
    snprintf(base, len, "%s", out);
    char* dot = strrchr(base, '.');
    if (dot && !strchr(dot, '/')) *dot = 0;
    // the arrays written beside the grid: neither the input nor the grid itself
    const char* beside[] = {".npy", "_t.npy", "_trace_x_t.npy", "_trace_x0_hat.npy", "_trace_t.npy",
                            "_trace_x_t.png", "_trace_x0_hat.png"};
    for (int i = 0; i < (int)(sizeof beside / sizeof beside[0]); i++) {
        char path[4400];
        snprintf(path, sizeof path, "%s%s", base, beside[i]);
        if (!strcmp(path, out)) die("%s %s: the arrays written beside the grid would replace it; pass a .png path", flag, out);
        check_not_input(path, flag, o->checkpoint);
    }
}

// How to sample from or evaluate a checkpoint trained with ob: its mean type and its
// variance, which --sigma may replace when it is a fixed one.
static Sampler checkpoint_sampler(const Options* o, const Objective* ob, const char* path) {
    check_objective_flags(o, ob, path);
    Sampler sp = o->sampler;
    sp.mean = ob->mean;
    if (ob->var == VAR_LEARNED) {
        if (given(o, "--sigma")) usage_error("--sigma applies to a fixed variance; %s has a learned Sigma_theta", path);
        if (sp.kind != SAMPLER_ALG2)
            usage_error("--sampler %s needs a fixed variance; %s has a learned Sigma_theta", SAMPLER_NAMES[sp.kind], path);
        sp.var = VAR_LEARNED;
    } else if (!given(o, "--sigma")) {
        sp.var = ob->var;
    }
    return sp;
}

// --steps K as a chain (10.2): the trained schedule respaced to K steps, or a copy for K = T.
// A predicted mu_theta or a learned Sigma_theta belongs to one step of the trained chain,
// not to a respaced step that spans many, so those checkpoints run the full chain only.
static int chain_steps(const Options* o, const Sampler* sp, int T) {
    long K = o->steps;
    if (K < 1 || K > T) usage_error("--steps %ld: expected a number of sampling steps from 1 to %d", K, T);
    if (K < T && (sp->mean == MEAN_MU || sp->var == VAR_LEARNED))
        usage_error("--steps %ld: a checkpoint with %s predicts one step of the %d-step chain; "
                    "run it without --steps", K, sp->mean == MEAN_MU ? "--mean-type mu" : "--var-type learned", T);
    return (int)K;
}

// What sample, bpd, reconstruct and interpolate check before they build the network
// (3.4 GB for the paper's model at 64 images): the checkpoint itself (checksum and
// header, into *hd) and the flags against its objective (the Sampler they give). Returns
// the checkpoint open after its header, for load_ema to read on once the rest is checked.
static FILE* checkpoint_first(const Options* o, CheckpointHeader* hd, Sampler* sp) {
    FILE* f = checkpoint_open(o->checkpoint, hd);
    Objective ob = objective_from_header(hd);
    *sp = checkpoint_sampler(o, &ob, o->checkpoint);
    return f;
}

static void check_channels(const Config* c, const char* path) {
    if (c->in_ch != 1 && c->in_ch != 3)
        die("%s: a %d-channel network; image grids are grey (1) or RGB (3)", path, c->in_ch);
}

// The test set the network's images come from: a folder --data names, decoded at the
// network's side and channels; else Fashion-MNIST for one channel, else --data's.
static void load_test_set(Dataset* test, const Config* c, const Options* o) {
    if (data_is_folder(o)) data_load(test, o, 0, c->img, c->in_ch, 1);
    else dataset_load(test, c->in_ch == 1 ? "fashion-mnist" : o->data, o->data_dir, 0);
    if (test->C != c->in_ch || test->H != c->img || test->W != c->img)
        die("%s takes %d-channel %dx%d images, but the %s test set holds %d-channel %dx%d ones; "
            "pass the --data it was trained on", o->checkpoint, c->in_ch, c->img, c->img,
            test->name, test->C, test->H, test->W);
    for (int i = 0; i < o->n_index; i++)
        if (o->index[i] >= test->N)
            usage_error("--index %d: the %s test set has images 0 to %d", o->index[i], test->name, test->N - 1);
}

// --t as 0-based steps of s.
static int step_list(const Options* o, int* t_idx, int T) {
    for (int i = 0; i < o->n_tlist; i++) {
        if (o->tlist[i] > T) usage_error("--t %d: expected steps from 1 to %d", o->tlist[i], T);
        t_idx[i] = o->tlist[i] - 1;
    }
    return o->n_tlist;
}

// A chain that did not finish: its watcher saw NaN or inf (a broken network), or Ctrl-C.
static void chain_stopped(const Progress* fin, const char* ckpt) {
    if (fin->t_bad)
        die("the chain left the finite range at t = %d (x_t holds NaN or inf): %s gives no usable pictures "
            "(a diverged run?); nothing written", fin->t_bad, ckpt);
    die("interrupted; nothing written");
}

static int cmd_sample(const Options* o) {
    if (!o->checkpoint) usage_error("sample needs --checkpoint PATH");
    int n = o->n;
    char out[4200], base[4200], path[4400];
    output_paths(o, "samples.png", out, base, sizeof out);   // before the network is built
    if (o->npz) {
        check_output_path(o->npz, "--npz", o->checkpoint);
        if (same_file(o->npz, out) || !strcmp(o->npz, out)) die("--npz %s is the grid's path too; pass another", o->npz);
    }
    CheckpointHeader hd;
    Sampler sp;
    FILE* f = checkpoint_first(o, &hd, &sp);
    Config c = config_from_header(&hd);
    check_channels(&c, o->checkpoint);
    int K = chain_steps(o, &sp, hd.T), Bm = eval_batch(&c, n, 64);
    if (K <= 50 && K < hd.T && !given(o, "--sampler") && !given(o, "--sigma"))   // where it measured better
        sp.kind = SAMPLER_DPM;                                                   // (notebooks/README.md)
    double have = memory_available_gib(), need = network_gib(&c, Bm, 0) + 5.0 * n * c.in_ch * c.img * c.img / 1073741824;
    if (have >= 0 && need > have)   // the samples as floats, and as bytes for the grid
        die("sample -n %d: %d samples at %dx%d and the network need about %.1f GiB of memory, and %.1f GiB is available; "
            "pass a smaller -n", n, n, c.img, c.img, need, have);
    UNet m;
    Schedule trained, s;
    load_ema(&m, &trained, f, &hd, o->checkpoint, Bm);
    schedule_respace(&s, &trained, K, sp.kind == SAMPLER_DPM);
    size_t sz = (size_t)m.cfg.in_ch * m.cfg.img * m.cfg.img;
    float* imgs = malloc_check((size_t)n * sz * sizeof(float), "samples");
    Trace trace;
    if (o->trace) trace_init(&trace, Bm < 8 ? Bm : 8, s.T, sz);
    Progress pg;
    const Watch* w = progress_start(&pg, "sampling: step", (long)((n + Bm - 1) / Bm) * s.T, 1, o->trace ? &trace : NULL);
    install_signal_handlers();
    Rng rng;
    rng_seed(&rng, (uint64_t)o->seed);
    if (!p_sample_loop(&m, &s, &sp, imgs, n, &rng, w)) chain_stopped(&pg, o->checkpoint);
    int shape[4] = {n, m.cfg.in_ch, m.cfg.img, m.cfg.img};
    snprintf(path, sizeof path, "%s.npy", base);
    if (save_grid_png(out, imgs, n, m.cfg.in_ch, m.cfg.img, m.cfg.img, (int)ceil(sqrt((double)n))) ||
        save_npy(path, imgs, 4, shape) || (o->npz && save_npz(o->npz, imgs, n, m.cfg.in_ch, m.cfg.img, m.cfg.img)))
        return 1;
    printf("wrote %s and %s (%d samples, %d steps, %s)\n", out, path, n, s.T,
           sp.kind == SAMPLER_DPM ? "DPM-Solver++(2M)" : sp.kind ? (sp.eta > 0 ? "DDIM, eta > 0" : "DDIM, eta = 0") : "Alg. 2");
    if (o->npz) printf("wrote %s (arr_0: %d x %d x %d x %d uint8)\n", o->npz, n, m.cfg.img, m.cfg.img, m.cfg.in_ch);
    if (o->trace) {
        int shape5[5] = {trace.n_steps, trace.n_images, m.cfg.in_ch, m.cfg.img, m.cfg.img}, ts[1] = {trace.n_steps};
        float steps_f[1024];
        for (int k = 0; k < trace.n_steps; k++) steps_f[k] = (float)trace.steps[k];
        const char* names[5] = {"_trace_x_t.npy", "_trace_x0_hat.npy", "_trace_t.npy", "_trace_x_t.png", "_trace_x0_hat.png"};
        for (int k = 0; k < 5; k++) {   // the first failure ends it, in one line
            snprintf(path, sizeof path, "%s%s", base, names[k]);
            const float* what = k == 0 || k == 3 ? trace.x_t : trace.x0_hat;
            if (k == 2 ? save_npy(path, steps_f, 1, ts) : k < 2 ? save_npy(path, what, 5, shape5)
                       : save_trace_png(path, what, &trace, m.cfg.in_ch, m.cfg.img, m.cfg.img))
                return 1;
        }
        printf("wrote %s_trace_{x_t,x0_hat,t}.npy and %s_trace_{x_t,x0_hat}.png (t = %d ... %d)\n",
               base, base, trace.steps[0], trace.steps[trace.n_steps - 1]);
        trace_free(&trace);
    }
    free(imgs); schedule_free(&s); schedule_free(&trained); unet_free(&m);
    return 0;
}

// --per-t FILE.csv: one row per step of the chain, t ascending (Table 4, Fig. 5).
static void write_per_t_csv(const char* path, const PerT* pt, const BoundBpd* r, const Schedule* s) {
    int T = s->T;
    double* rate = malloc_check((size_t)T * sizeof(double), "the rates");
    bound_rate(rate, pt->term, r->prior, T);
    size_t cap = (size_t)T * 96 + 256, len = 0;
    char* buf = malloc_check(cap, "the per-t table");
    len += snprintf(buf + len, cap - len, "t,term_bpd,rate_bpd,distortion_rmse\n");
    for (int t = 0; t < T; t++)
        len += snprintf(buf + len, cap - len, "%d,%.9g,%.9g,%.9g\n", s->t_model[t] + 1, pt->term[t], rate[t],
                        127.5 * sqrt(pt->mse[t]));
    if (write_file_atomic(path, buf, len, NULL, 0)) exit(1);
    free(buf); free(rate);
}

static int cmd_bpd(const Options* o) {
    if (!o->checkpoint) usage_error("bpd needs --checkpoint PATH");
    int n = o->n;
    CheckpointHeader hd;
    Sampler sp;
    FILE* f = checkpoint_first(o, &hd, &sp);
    Config c = config_from_header(&hd);
    int K = chain_steps(o, &sp, hd.T);
    if (o->t_samples > K - 1)
        usage_error("--t-samples %d: expected 1 to %d (the chain's KL terms), or leave it out for all", o->t_samples, K - 1);
    if (o->per_t) check_output_path(o->per_t, "--per-t", o->checkpoint);
    Dataset test;
    load_test_set(&test, &c, o);
    int images = n < test.N ? n : test.N, Bm = eval_batch(&c, images, 32);   // sized by the images there are
    check_memory(&c, Bm, 0, "pass a smaller -n");
    UNet m;
    Schedule trained, s;
    load_ema(&m, &trained, f, &hd, o->checkpoint, Bm);
    schedule_respace(&s, &trained, K, 0);
    PerT pt = {NULL, NULL};
    if (o->per_t) {
        pt.term = malloc_check((size_t)s.T * sizeof(double), "the per-t terms");
        pt.mse = malloc_check((size_t)s.T * sizeof(double), "the per-t terms");
    }
    int levels = o->t_samples > 0 ? o->t_samples + 1 : s.T;
    Progress pg;
    const Watch* w = progress_start(&pg, "bound: step", (long)((images + Bm - 1) / Bm) * levels, 0, NULL);
    install_signal_handlers();
    Rng rng;
    rng_seed(&rng, (uint64_t)o->seed);
    BoundBpd r = eval_bpd(&m, &s, &sp, &test, n, o->t_samples, &rng, o->per_t ? &pt : NULL, w);
    if (stop_requested) die("interrupted; no result");
    printf("variational bound (Eq. 5) on %d %s test images, %d steps, sigma_t^2 = %s, bits/dim:\n", r.n, test.name,
           s.T, sp.var == VAR_FIXEDLARGE ? "beta_t" : sp.var == VAR_FIXEDSMALL ? "beta_tilde_t" : "learned");
    if (o->t_samples)
        printf("  (sum L_{t-1} estimated from %d stratified t per image; the std. error includes that sampling)\n",
               o->t_samples);
    printf("  L_T            %.6f\n  sum L_{t-1}    %.6f\n  L_0            %.6f\n  total (NLL <=) %.6f\n",
           r.prior, r.terms, r.decoder, r.total);
    if (r.n > 1) printf("  std. error     %.6f  (of the total, over the %d images)\n", r.std_err, r.n);
    if (o->per_t) {
        write_per_t_csv(o->per_t, &pt, &r, &s);
        printf("wrote %s (%d rows: t, term_bpd, rate_bpd, distortion_rmse)\n", o->per_t, s.T);
        free(pt.term); free(pt.mse);
    }
    dataset_free(&test); schedule_free(&s); schedule_free(&trained); unet_free(&m);
    return 0;
}

// Writes the grid (rows x cols images) as PNG and .npy, and the rows' t as BASE_t.npy.
static int save_rows(const char* out, const char* base, const float* grid, int rows, int cols,
                     const int* t_idx, const Config* c) {
    char path[4400];
    int shape[5] = {rows, cols, c->in_ch, c->img, c->img}, shape_t[1] = {rows};
    float t1[64];
    for (int r = 0; r < rows; r++) t1[r] = (float)(t_idx[r] + 1);
    if (save_grid_png(out, grid, rows * cols, c->in_ch, c->img, c->img, cols)) return 1;
    snprintf(path, sizeof path, "%s.npy", base);
    if (save_npy(path, grid, 5, shape)) return 1;
    snprintf(path, sizeof path, "%s_t.npy", base);
    if (save_npy(path, t1, 1, shape_t)) return 1;
    printf("wrote %s, %s.npy (%d x %d x %d x %d x %d) and %s_t.npy\n", out, base, rows, cols, c->in_ch, c->img,
           c->img, base);
    return 0;
}

// reconstruct (Fig. 7: per t, x_0, x_t and k decodings) and interpolate (Figs. 8-9: per t,
// x_0, the decoded interpolations, x'_0): the same run of the chain from data.
static int cmd_from_data(const Options* o, int interp) {
    const char* cmd = interp ? "interpolate" : "reconstruct";
    if (!o->checkpoint) usage_error("%s needs --checkpoint PATH", cmd);
    if (o->n_index != 1 + interp)
        usage_error(interp ? "interpolate needs --index A,B: two test images" : "reconstruct needs --index I: one test image");
    int k = interp ? o->lambdas : o->k, cols = k + 2, t_idx[64];
    CheckpointHeader hd;
    Sampler sp;
    FILE* f = checkpoint_first(o, &hd, &sp);
    Config c = config_from_header(&hd);
    check_channels(&c, o->checkpoint);
    Dataset test;
    load_test_set(&test, &c, o);
    int rows = step_list(o, t_idx, hd.T);
    char out[4200], base[4200], png[64], what[64];
    snprintf(png, sizeof png, "%s.png", cmd);
    snprintf(what, sizeof what, "%s: step", cmd);
    output_paths(o, png, out, base, sizeof out);
    check_memory(&c, k, 0, interp ? "pass a smaller --lambdas" : "pass a smaller -k");
    UNet m;
    Schedule s;
    load_ema(&m, &s, f, &hd, o->checkpoint, k);
    size_t n = (size_t)m.cfg.in_ch * m.cfg.img * m.cfg.img;
    float* grid = malloc_check((size_t)rows * cols * n * sizeof(float), "the output grid");
    install_signal_handlers();
    Rng rng;
    rng_seed(&rng, (uint64_t)o->seed);
    long total = 0;
    for (int r = 0; r < rows; r++) total += t_idx[r] + 1;
    Progress pg;
    const Watch* w = progress_start(&pg, what, total, 1, NULL);
    for (int r = 0; r < rows; r++) {
        float *row = grid + (size_t)r * cols * n, *last = row + (size_t)(cols - 1) * n;
        dataset_image(row, &test, o->index[0], 0);                              // x_0
        if (interp) dataset_image(last, &test, o->index[1], 0);                 // x'_0
        int done = interp ? interpolate(&m, &s, &sp, row, last, t_idx[r], k, row + n, &rng, w)
                          : reconstruct(&m, &s, &sp, row, t_idx[r], k, row + n, row + 2 * n, &rng, w);
        if (!done) chain_stopped(&pg, o->checkpoint);
    }
    int fail = save_rows(out, base, grid, rows, cols, t_idx, &m.cfg);
    free(grid); dataset_free(&test); schedule_free(&s); unet_free(&m);
    return fail;
}

static int cmd_schedule(const Options* o) {
    Schedule s;
    schedule_init(&s, 1000, (ScheduleKind)o->schedule);
    printf("t,beta,alpha_bar,beta_tilde,log_beta_tilde_clipped,posterior_mean_coef1,posterior_mean_coef2\n");
    for (int i = 0; i < s.T; i++)
        printf("%d,%.9g,%.9g,%.9g,%.9g,%.9g,%.9g\n", i + 1, s.betas[i], s.alphas_cumprod[i], s.posterior_variance[i],
               s.posterior_log_variance_clipped[i], s.posterior_mean_coef1[i], s.posterior_mean_coef2[i]);
    schedule_free(&s);
    return 0;
}

// export: a checkpoint's EMA weights (what sample and bpd use) as an exchange file
// (section 21), with its configuration and step; tests/reference.py's DDPMUNet loads it.
static int cmd_export(const Options* o) {
    if (!o->checkpoint || !o->out) usage_error("export needs --checkpoint PATH and --out FILE.ref");
    check_output_path(o->out, "--out", o->checkpoint);
    CheckpointHeader hd;
    UNet m;
    Schedule s;
    load_ema_model(&m, &s, &hd, o->checkpoint, 1);
    Objective ob = objective_from_header(&hd);
    ExWriter w;
    if (ex_begin(&w, o->out) != 0) return 1;
    ex_config(&w, &m.cfg);
    int kinds[3] = {ob.mean, ob.var, ob.loss}, one = 1;
    ex_ints(&w, "config.objective", kinds, 3);
    ex_record(&w, "config.dropout", 1, &one, &m.cfg.dropout);
    // float32 holds whole numbers exactly up to 2^24: a larger step goes as two values,
    // step mod 2^24 and step / 2^24
    float step[2] = {(float)(hd.step & 0xffffff), (float)(hd.step >> 24)};
    int two = hd.step >> 24 ? 2 : 1;
    ex_record(&w, "meta.step", 1, &two, step);
    for (int i = 0; i < m.L->n_tensors; i++) {
        const ParamTensor* t = &m.L->tensors[i];
        char name[80];
        snprintf(name, sizeof name, "param.%s", t->name);
        ex_record(&w, name, t->ndim, t->shape, m.params + t->offset);
    }
    int r = ex_finish(&w);
    if (r == 0) fprintf(stderr, "exported the EMA weights of %s (step %llu, %zu parameters in %d tensors) to %s\n",
                        o->checkpoint, (unsigned long long)hd.step, m.n_params, m.L->n_tensors, o->out);
    unet_free(&m); schedule_free(&s);
    return r == 0 ? 0 : 1;
}

// import: a checkpoint of weights trained elsewhere, e.g. by tests/train_torch.py. The
// network is the file's config.* records, else the flags' (--data, --model, network
// flags); the weights become both the parameters and the EMA, Adam starts from zero,
// and --resume continues it at the file's meta.step with --batch (default 128).
static int cmd_import(const Options* o) {
    if (!o->weights || !o->out) usage_error("import needs --weights FILE.ref and --out PATH (the checkpoint to write)");
    check_output_path(o->out, "--out", o->weights);
    if (file_size(o->out) >= 0) usage_error("--out %s already exists; remove it or pass another path", o->out);
    Exchange x;
    exchange_read(&x, o->weights);
    Objective ob = PAPER_OBJECTIVE;
    Config cfg = {0};
    cfg.dropout = 0.1f;   // Appendix B's, unless the file has config.dropout: used only if it is trained on
    int got = exchange_config(&x, &cfg, &ob, o->weights);
    if (got & 2) check_objective_flags(o, &ob, o->weights);   // the file's objective decides
    else ob = o->obj;
    if (!(got & 1)) {   // the network from the flags
        float dropout = cfg.dropout;
        Options f = *o;
        f.obj = ob;
        cfg = options_config(&f, 0);
        if (exchange_find(&x, "config.dropout", o->weights)) cfg.dropout = dropout;
    }
    const char* why = objective_check(&ob, &OBJECTIVE_FLAGS);
    if (why) usage_error("%s", why);
    // The file must hold the network's weights before the network is built for them.
    UNet plan;
    unet_plan(&plan, &cfg, 1);
    exchange_weights(&x, &plan, NULL, o->weights);
    free(plan.L);
    install_signal_handlers();   // Ctrl-C from here on ends cleanly: no half-written .tmp
    Trainer tr;
    trainer_init(&tr, &cfg, &ob, 0, 1, (ScheduleKind)o->schedule, &o->hyper, (uint64_t)o->seed);   // no images
    exchange_weights(&x, &tr.net, tr.net.params, o->weights);
    memcpy(tr.ema, tr.net.params, tr.net.n_params * sizeof(float));
    int step[2] = {0, 0}, k = exchange_ints(&x, "meta.step", step, 2, o->weights);
    if (k == 0) die("%s: meta.step holds no value", o->weights);
    if (k == 2 && step[0] >= 1 << 24) die("%s: meta.step's first value %d is not below 2^24", o->weights, step[0]);
    tr.step = k > 0 ? (uint64_t)step[0] + ((uint64_t)step[1] << 24) : 0;
    tr.B = o->batch;   // the header's batch, which --resume must use; the buffers were made for one image
    char err[4400];
    if (stop_requested) die("interrupted; nothing written");
    if (checkpoint_save(&tr, (ScheduleKind)o->schedule, o->out, err, sizeof err) != 0) die("%s", err);
    fprintf(stderr, "imported %zu parameters in %d tensors from %s into %s (step %llu)\n",
            tr.net.n_params, tr.net.L->n_tensors, o->weights, o->out, (unsigned long long)tr.step);
    trainer_free(&tr);
    exchange_free(&x);
    return 0;
}

// The counts from two plans (unet_plan, for 1 and 2 images): nothing is allocated for
// the network itself, whatever its size.
static int cmd_params(const Options* o) {
    Config c = options_config(o, 0);
    UNet m1, m2;
    unet_plan(&m1, &c, 1);
    printf("%-24s %12s\n", "block", "parameters");
    const UNetLayers* L1 = m1.L;
    for (int i = 0; i < L1->n_tensors;) {
        size_t sum = 0;
        int j = i;
        while (j < L1->n_tensors && !strcmp(L1->tensors[j].group, L1->tensors[i].group)) sum += L1->tensors[j++].numel;
        printf("%-24s %12zu\n", L1->tensors[i].group, sum);
        i = j;
    }
    printf("%-24s %12zu\n", "total", m1.n_params);
    unet_plan(&m2, &c, 2);
    const UNetLayers* L2 = m2.L;
    double per = ((L2->n_acts + L2->n_grad_acts + L2->n_work) - (L1->n_acts + L1->n_grad_acts + L1->n_work)) * 4.0 / 1048576;
    double fixed = (L1->n_acts + L1->n_grad_acts + L1->n_work) * 4.0 / 1048576 - per;
    printf("activation memory: %.2f MiB per image (+ %.2f MiB fixed); parameter state: %.1f MiB\n",
           per, fixed, m1.n_params * 4.0 * 6 / 1048576);
    free(m1.L); free(m2.L);
    return 0;
}

// ---- 22.3 The commands, the parser and --help ----

static int cmd_reconstruct(const Options* o) { return cmd_from_data(o, 0); }
static int cmd_interpolate(const Options* o) { return cmd_from_data(o, 1); }
static int cmd_help(const Options* o);

typedef struct { const char* name; int bit; int (*run)(const Options*); const char *args, *what; } Command;
static const Command COMMANDS[] = {   // the first is the default
    {"train", C_TRAIN, cmd_train, "[train] [flags]", "train (Alg. 1), writing samples and checkpoints"},
    {"sample", C_SAMPLE, cmd_sample, "sample --checkpoint PATH", "draw samples (Alg. 2) into a PNG grid"},
    {"bpd", C_BPD, cmd_bpd, "bpd --checkpoint PATH", "the variational bound (Eq. 5) in bits/dim"},
    {"reconstruct", C_RECONSTRUCT, cmd_reconstruct, "reconstruct --checkpoint PATH --index I", "x_0 -> x_t -> k decodings (Fig. 7)"},
    {"interpolate", C_INTERPOLATE, cmd_interpolate, "interpolate --checkpoint PATH --index A,B", "interpolations at x_t (Fig. 8)"},
    {"export", C_EXPORT, cmd_export, "export --checkpoint PATH --out F.ref", "the EMA weights, named as PyTorch's (tests/)"},
    {"import", C_IMPORT, cmd_import, "import --weights F.ref --out PATH", "a checkpoint of weights trained elsewhere"},
    {"schedule", C_SCHEDULE, cmd_schedule, "schedule", "the noise schedule as CSV"},
    {"params", C_PARAMS, cmd_params, "params [--model NAME]", "parameter counts per block, activation memory"},
    {"help", C_HELP, cmd_help, "help", "this text"},
};
#define N_COMMANDS (int)(sizeof COMMANDS / sizeof COMMANDS[0])

// "train, sample and bpd": the commands in the bits of mask.
static const char* command_names(unsigned mask) {
    static char s[256];
    int n = 0, k = 0;
    for (int i = 0; i < N_COMMANDS; i++) n += COMMANDS[i].bit && (mask & COMMANDS[i].bit);
    s[0] = 0;
    for (int i = 0; i < N_COMMANDS; i++) {
        if (!COMMANDS[i].bit || !(mask & COMMANDS[i].bit)) continue;
        k++;
        snprintf(s + strlen(s), sizeof s - strlen(s), "%s%s", COMMANDS[i].name, k == n ? "" : k == n - 1 ? " and " : ", ");
    }
    return s;
}

// What no table row sets: the paper's hyper-parameters and objective (Part I), and the
// network overrides at -1, "keep the preset's".
static void options_init(Options* o) {
    memset(o, 0, sizeof *o);
    o->hyper = PAPER_HYPER;
    o->obj = PAPER_OBJECTIVE;
    o->ch = o->num_res_blocks = o->groups = o->in_ch = -1;
    o->dropout = -1;
}

// The presets' plans for a flag that one sets (--batch, --steps, --warmup, --lr,
// --var-type), as --help's "(default: tiny 32, small 32, ...)"; 0 for other flags.
static int plan_default(const Option* p, char* def, size_t len) {
    if (p->at != AT(batch) && p->at != AT(steps) && p->at != AT(hyper.warmup) && p->at != AT(hyper.lr) &&
        p->at != AT(obj.var))
        return 0;
    int k = snprintf(def, len, " (default: ");
    for (int j = 0; j < N_PRESETS && k < (int)len; j++) {
        const Preset* r = &PRESETS[j];
        k += snprintf(def + k, len - k, "%s%s ", j ? ", " : "", r->name);
        if (p->at == AT(batch)) k += snprintf(def + k, len - k, "%d", r->batch);
        else if (p->at == AT(steps)) k += snprintf(def + k, len - k, "%ld", r->steps);
        else if (p->at == AT(hyper.warmup)) k += snprintf(def + k, len - k, "%d", r->warmup);
        else if (p->at == AT(hyper.lr)) k += snprintf(def + k, len - k, "%g", r->lr);
        else k += snprintf(def + k, len - k, "%s", VAR_NAMES[r->var]);
    }
    if (k < (int)len) snprintf(def + k, len - k, ")");
    return 1;
}

// --help, printed from COMMANDS and OPTIONS.
static void print_help(FILE* f) {
    fprintf(f, "ddpm.c: Denoising Diffusion Probabilistic Models (Ho, Jain, Abbeel 2020) on a CPU.\n\n");
    for (int i = 0; i < N_COMMANDS; i++)
        fprintf(f, "%s ./ddpm %-42s %s\n", i ? "      " : "usage:", COMMANDS[i].args, COMMANDS[i].what);
    Options base;   // the defaults that come from Part I rather than the table
    options_init(&base);
    for (int i = 0; i < N_OPTIONS; i++) {
        const Option* p = &OPTIONS[i];
        if (p->type == OPT_HEADING) { fprintf(f, "\n%s\n", p->help); continue; }
        char left[64], def[96] = "";
        snprintf(left, sizeof left, "%s%s%s", p->name, p->arg ? " " : "", p->arg ? p->arg : "");
        const char* field = (const char*)&base + p->at;
        if ((p->cmds & C_TRAIN) && plan_default(p, def, sizeof def)) {   // "(default: tiny 32, ...)"
        } else if (p->def) snprintf(def, sizeof def, " (default %s)", p->def);
        else if (p->type == OPT_FLOAT && *(const float*)field > 0) snprintf(def, sizeof def, " (default %g)", *(const float*)field);
        else if (p->type == OPT_INT && *(const int*)field > 0) snprintf(def, sizeof def, " (default %d)", *(const int*)field);
        else if (p->type == OPT_WORD) snprintf(def, sizeof def, " (default %s)", p->words[*(const int*)field]);
        char text[512];
        snprintf(text, sizeof text, "%s%s", p->help, def);
        fprintf(f, "  %-30s", left);
        if (strlen(left) > 30) fprintf(f, "\n%32s", "");
        for (const char* s = text; *s;) {   // wrapped at 100 columns
            int k = (int)strlen(s);
            if (k > 68) for (k = 68; k > 0 && s[k] != ' '; k--) {}
            if (k == 0) k = (int)strlen(s);
            fprintf(f, " %.*s\n", k, s);
            s += k;
            while (*s == ' ') s++;
            if (*s) fprintf(f, "%32s", "");
        }
    }
    fprintf(f, "\nexit status: 0 done; 1 an error (one line on stderr says what to do); 2 a bad flag;\n"
               "  130 / 143 training stopped by Ctrl-C / SIGTERM after saving its checkpoint (--resume continues)\n");
}

static int cmd_help(const Options* o) {
    (void)o;
    if (world_rank == 0) print_help(stdout);   // once, under mpirun too
    return 0;
}

// argv into o: the command, the table's defaults for it, then the flags in order. An
// unknown flag, one the command does not read, a missing or bad value: exit 2.
static void parse_options(int argc, char** argv, Options* o) {
    options_init(o);
    const Command* c = &COMMANDS[0];
    int i = 1;
    if (argc > 1 && argv[1][0] != '-') {
        for (c = COMMANDS; c < COMMANDS + N_COMMANDS && strcmp(c->name, argv[1]); c++) {}
        if (c == COMMANDS + N_COMMANDS)
            usage_error("unknown command '%s'; commands are %s", argv[1], command_names(~0u));
        i = 2;
    }
    o->cmd = c->bit;
    o->cmd_name = c->name;
    for (int j = 0; j < N_OPTIONS; j++)   // the defaults go through the same parser
        if (OPTIONS[j].def && (OPTIONS[j].cmds & o->cmd)) option_set(o, &OPTIONS[j], OPTIONS[j].def);
    for (; i < argc; i++) {
        const char* a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) { o->cmd = C_HELP; o->cmd_name = "help"; return; }
        unsigned all = 0;
        const Option* p = NULL;
        for (int j = 0; j < N_OPTIONS; j++) {
            if (!OPTIONS[j].name || strcmp(OPTIONS[j].name, a)) continue;
            all |= OPTIONS[j].cmds;
            if (!p && (OPTIONS[j].cmds & o->cmd)) p = &OPTIONS[j];
        }
        if (!all) usage_error("unknown flag '%s'", a);
        if (!p) usage_error("%s applies to %s, not %s", a, command_names(all), o->cmd_name);
        if (p->type == OPT_ON || p->type == OPT_OFF) *(int*)((char*)o + p->at) = p->type == OPT_ON;
        else if (i + 1 < argc) option_set(o, p, argv[++i]);
        else usage_error("%s needs a value", a);
        o->given[p - OPTIONS] = 1;
    }
    // The preset's plan for what was not given (the batch of --resume is the checkpoint's).
    const Preset* plan = preset_named(o->model ? o->model : "");
    if (plan && (o->cmd & (C_TRAIN | C_IMPORT))) {
        if (!given(o, "--batch")) o->batch = plan->batch;
        if (!given(o, "--steps") && o->cmd == C_TRAIN) o->steps = plan->steps;
        if (!given(o, "--warmup")) o->hyper.warmup = plan->warmup;
        if (!given(o, "--lr")) o->hyper.lr = plan->lr;
        if (!given(o, "--var-type") && o->cmd == C_TRAIN) o->obj.var = plan->var;
    }
    if (!given(o, "--img")) {   // the preset's own side: 32, or paper256's 256
        Config c;
        o->img = preset_find(o->model ? o->model : "", 0, &c) == 1 ? c.img : 32;
    }
    // What one flag cannot say alone:
    if (given(o, "--eta") && o->sampler.kind != SAMPLER_DDIM) usage_error("--eta applies to --sampler ddim");
    if (o->sampler.kind != SAMPLER_ALG2 && given(o, "--sigma"))
        usage_error("--sigma applies to --sampler ddpm; DDIM's variance is set by --eta, DPM-Solver++ has none");
    if (o->t_samples && o->per_t) usage_error("--per-t needs every term; drop --t-samples");
    struct stat st;
    if ((o->cmd & (C_TRAIN | C_BPD | C_DECODE)) && data_is_folder(o)) {
        if (stat(o->data, &st) != 0)
            usage_error("--data %s: %s; pass cifar10, fashion-mnist or a folder of pictures", o->data, strerror(errno));
        if (!S_ISDIR(st.st_mode)) usage_error("--data %s is a file, not a folder; pass the folder that holds the pictures", o->data);
    }
    if (o->img & (o->img - 1)) usage_error("--img %d: expected a power of two from 16 to 256", o->img);
    if (o->img != 32 && o->cmd == C_TRAIN && !data_is_folder(o) && !given(o, "--img"))
        usage_error("--model %s is the %dx%d network; train it on a folder of pictures (--data DIR), or pick "
                    "tiny, small or paper for %s", o->model, o->img, o->img, o->data);
    if (o->img != 32 && o->cmd == C_TRAIN && !data_is_folder(o))
        usage_error("--img %d: %s is 32x32; --img resizes a folder of pictures (--data DIR)", o->img, o->data);
    if (given(o, "--in-ch") && o->cmd == C_TRAIN && data_is_folder(o) && o->in_ch != 1 && o->in_ch != 3)
        usage_error("--in-ch %d: a folder of pictures is read as grey (1) or RGB (3)", o->in_ch);
}

#ifndef DDPM_NO_MAIN
int main(int argc, char** argv) {
    threads_spin_briefly(argv);
#ifdef DDPM_MPI
    world_init(&argc, &argv);
#endif
    Options o;
    parse_options(argc, argv, &o);
    if (world_size > 1 && o.cmd != C_TRAIN && o.cmd != C_HELP)
        usage_error("%s runs as one process; only train splits over MPI ranks (run ./ddpm %s)", o.cmd_name, o.cmd_name);
#ifdef _OPENMP
    if (o.threads > 0) omp_set_num_threads(o.threads);
    else if (omp_get_max_threads() > MAX_THREADS) {   // OMP_NUM_THREADS=100000
        fprintf(stderr, "ddpm: %d threads asked for (OMP_NUM_THREADS); using %d\n", omp_get_max_threads(), MAX_THREADS);
        omp_set_num_threads(MAX_THREADS);
    }
#endif
    if (!(o.cmd & (C_TRAIN | C_IMPORT)))
        memory_fix = o.cmd & (C_SAMPLE | C_BPD) ? "pass a smaller -n" : o.cmd == C_RECONSTRUCT ? "pass a smaller -k"
                   : o.cmd == C_INTERPOLATE ? "pass a smaller --lambdas" : "close other programs";
    int rc = 0;
    for (int i = 0; i < N_COMMANDS; i++)
        if (COMMANDS[i].bit == o.cmd) rc = COMMANDS[i].run(&o);
    // What went to stdout (a table, a bound, --help) must have arrived: a full disk or a
    // closed pipe is an error, not a torn file and exit 0.
    if (fflush(stdout) != 0 || ferror(stdout)) {
        fprintf(stderr, "ddpm: could not write the standard output: %s; what it holds is incomplete\n",
                strerror(errno ? errno : EIO));
        rc = rc ? rc : 1;
    }
#ifdef DDPM_MPI
    world_finish();
#endif
    return rc;
}
#endif // DDPM_NO_MAIN

// ----------------------------------------------------------------------------
// 23. Many machines: data-parallel training over MPI (`make mpi`)
//
// The paper trained its CIFAR-10 model on a TPU v3-8 (Appendix B). `mpirun -np N ./ddpm_mpi`
// splits each step's batch over N ranks, the way llm.c does: every rank draws the whole
// batch from the one seeded RNG (section 9) and computes its slice [r B/N, (r+1) B/N); the
// gradients are summed on rank 0 and sent back, so clipping, Adam and the EMA see the
// whole batch's, the same on every rank. Rank 0 alone writes the run folder, whose
// checkpoints are the one process's (--resume works across rank counts); ranks stop
// together. A weight gradient's sum over the images is taken in another order (each
// rank's share, then the ranks), so the parameters agree with one process's to rounding.
// This is the whole of what training knows of it: the three functions section 9 declares.

// This process's i-th slice of a batch of B images: rank r's share is [r B/N, (r+1) B/N),
// computed as K micro-batches of B/(N K) images (cmd_train checked that N K divides B).
static int batch_slice(Slice* sl, int B, int K, int i) {
    if (i >= K) return 0;
    int share = B / world_size;
    sl->B = share / K;
    sl->start = world_rank * share + i * sl->B;
    return 1;
}

#ifdef DDPM_MPI
static double slices_mean_loss(double sum, int k) {
    double all;
    MPI_Allreduce(&sum, &all, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
    return all / ((double)k * world_size);
}

// Reduced on rank 0 and broadcast, rather than all-reduced: then every rank holds the
// very same bits, whatever order the reduction takes.
static void slices_mean_grads(float* g, size_t n, int k) {
    if (world_size == 1 && k == 1) return;
    if (n > INT_MAX) die("%zu parameters are more than one MPI message holds", n);
    if (world_rank == 0) MPI_Reduce(MPI_IN_PLACE, g, (int)n, MPI_FLOAT, MPI_SUM, 0, MPI_COMM_WORLD);
    else MPI_Reduce(g, NULL, (int)n, MPI_FLOAT, MPI_SUM, 0, MPI_COMM_WORLD);
    if (world_rank == 0) {
        float scale = 1.0f / ((float)k * world_size);
        for (size_t i = 0; i < n; i++) g[i] *= scale;
    }
    MPI_Bcast(g, (int)n, MPI_FLOAT, 0, MPI_COMM_WORLD);
}

static int world_max(int x) {
    int m;
    MPI_Allreduce(&x, &m, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    return m;
}

static void world_finish(void) { MPI_Finalize(); }

// Joins the job, and refuses ranks started with different command lines (an FNV-1a hash
// of the arguments, compared as its smallest and largest value over the ranks).
static void world_init(int* argc, char*** argv) {
    MPI_Init(argc, argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
    MPI_Comm_size(MPI_COMM_WORLD, &world_size);
    Fnv h = FNV_START;
    for (int i = 1; i < *argc; i++) fnv_update(&h, (*argv)[i], strlen((*argv)[i]) + 1);
    unsigned long long lo, hi;
    MPI_Allreduce(&h.h, &lo, 1, MPI_UNSIGNED_LONG_LONG, MPI_MIN, MPI_COMM_WORLD);
    MPI_Allreduce(&h.h, &hi, 1, MPI_UNSIGNED_LONG_LONG, MPI_MAX, MPI_COMM_WORLD);
    if (lo != hi)
        usage_error("the %d ranks were started with different flags; start every rank with the same command line",
                    world_size);
}
#else
static double slices_mean_loss(double sum, int k) { return sum / k; }
static void slices_mean_grads(float* g, size_t n, int k) {
    if (k == 1) return;
    for (size_t i = 0; i < n; i++) g[i] /= k;
}
static int world_max(int x) { return x; }
#endif
