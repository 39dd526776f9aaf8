// fuzz_ddpm: libFuzzer harnesses for the loaders of files a user may be handed: the
// checkpoint reader (section 20), the Fashion-MNIST IDX reader and the CIFAR-10 reader
// (section 19), and the exchange reader of ./ddpm import (section 21). Built by `make fuzz` with clang, -fsanitize=fuzzer,address,undefined,
// once per target:
//
//   tests/fuzz_checkpoint   each input is written as a checkpoint, its trailing FNV-1a
//                           re-sealed first (an edited header must be refused field by
//                           field, not only by the checksum), then loaded as `sample`
//                           loads one: header checks, the network built, the EMA read
//   tests/fuzz_idx          each input as t10k-images-idx3-ubyte, beside a valid labels
//                           file, then load_fashion_mnist
//   tests/fuzz_cifar        each input as test_batch.bin, then load_cifar10
//   tests/fuzz_exchange     each input as an exchange file, read as ./ddpm import reads one
//                           before it builds a network (records, config, weights vs the plan)
//   tests/fuzz_pixels       each input as the decoded cache of a folder of pictures (section
//                           19.1), its two checksums re-sealed and its key taken as the one
//                           wanted (so the geometry checks are what stands), then mapped and
//                           every pixel read as training reads them
//   tests/fuzz_pictures     each input as a picture of a folder (section 19.1): its header
//                           checked against its size, then decoded by stb_image through the
//                           callbacks that refuse a file cut short, cropped and resized; the
//                           seeds are whole, cut and header-only files of every format
//
// A refusal (die) comes back here by longjmp (DDPM_FUZZ), without its message, so it is
// not a crash: only what the sanitizers or a signal catch is. Refused loads leave files and buffers
// behind; the descriptors are closed after each input, the memory is small.
#define DDPM_NO_MAIN
#define DDPM_FUZZ
#include "../ddpm.c"
#include <dirent.h>

#ifndef FUZZ_TARGET
#error "build with -DFUZZ_TARGET=1 (checkpoint), 2 (idx), 3 (cifar), 4 (exchange), 5 (pixels) or 6 (pictures)"
#endif

static char dir[256];
static int first_fd = -1;

static void put(const char* name, const uint8_t* data, size_t n) {
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE* f = fopen(path, "wb");
    if (!f || fwrite(data, 1, n, f) != n || fclose(f) != 0) { perror(path); abort(); }
}

int LLVMFuzzerInitialize(int* argc, char*** argv) {
    (void)argc; (void)argv;
    snprintf(dir, sizeof dir, "/tmp/fuzz_ddpm.%d", (int)getpid());
    mkdir(dir, 0755);
    char sub[300];
    snprintf(sub, sizeof sub, "%s/fashion-mnist", dir); mkdir(sub, 0755);
    snprintf(sub, sizeof sub, "%s/cifar-10-batches-bin", dir); mkdir(sub, 0755);
    // a valid label file for the IDX target: magic 0x801, 1 label
    uint8_t labels[9] = {0, 0, 8, 1, 0, 0, 0, 1, 3};
    put("fashion-mnist/t10k-labels-idx1-ubyte", labels, sizeof labels);
    first_fd = dup(0);   // every descriptor from here on belongs to one input
    close(first_fd);
    return 0;
}

// The network a refused checkpoint had already built (the program would exit there), and
// the exchange file and plan a refused import had read.
static UNet net, plan;
static Exchange ex;

int LLVMFuzzerTestOneInput(const uint8_t* data, size_t n) {
    memset(&net, 0, sizeof net);
    memset(&plan, 0, sizeof plan);
    memset(&ex, 0, sizeof ex);
    if (setjmp(fuzz_refused) == 0) {
#if FUZZ_TARGET == 1
        uint8_t* b = malloc(n + 8);
        memcpy(b, data, n);
        if (n >= 8) {   // re-seal: the last 8 bytes become the FNV-1a of the rest
            Fnv sum = FNV_START;
            fnv_update(&sum, b, n - 8);
            memcpy(b + n - 8, &sum.h, 8);
        }
        put("fuzz.ckpt", b, n);
        free(b);
        char path[512];
        snprintf(path, sizeof path, "%s/fuzz.ckpt", dir);
        Schedule s;
        load_ema_model(&net, &s, NULL, path, 1);
        schedule_free(&s);
#elif FUZZ_TARGET == 2
        put("fashion-mnist/t10k-images-idx3-ubyte", data, n);
        Dataset d;
        load_fashion_mnist(&d, dir, 0);
        dataset_free(&d);
#elif FUZZ_TARGET == 3
        put("cifar-10-batches-bin/test_batch.bin", data, n);
        Dataset d;
        load_cifar10(&d, dir, 0);
        dataset_free(&d);
#elif FUZZ_TARGET == 5
        uint8_t* b = malloc(n + 1);
        memcpy(b, data, n);
        PixelCacheHeader hd;
        FolderSpec fs = {dir, dir, 32, 0, 255, 0, 1, 1};
        uint64_t key = 0;
        if (n >= sizeof hd) {   // re-seal both checksums; want the key and side it names
            memcpy(&hd, b, sizeof hd);
            Fnv sum = FNV_START;
            if (n > PIXEL_CACHE_DATA) fnv_update(&sum, b + PIXEL_CACHE_DATA, n - PIXEL_CACHE_DATA);
            hd.pixels_sum = sum.h;
            hd.header_sum = pixel_cache_header_sum(&hd);
            memcpy(b, &hd, sizeof hd);
            key = hd.key;
            fs.img = hd.side;
        }
        put("fuzz.pix", b, n);
        free(b);
        char path[512];
        snprintf(path, sizeof path, "%s/fuzz.pix", dir);
        Dataset d;
        memset(&d, 0, sizeof d);
        if (pixel_cache_map(&d, path, key, &fs, 1)) {
            float* x = malloc((size_t)d.C * d.H * d.W * sizeof(float));
            double total = 0;
            for (int i = 0; i < d.N; i++) {
                dataset_image(x, &d, i, i & 1);
                total += x[0];
            }
            if (!(total == total)) abort();
            free(x);
            dataset_free(&d);
        }
#elif FUZZ_TARGET == 6
        put("fuzz.img", data, n);
        char path[512];
        snprintf(path, sizeof path, "%s/fuzz.img", dir);
        const char* why = NULL;
        FolderSpec fs = {dir, dir, 16, 0, 255, 0, 1, 1};
        uint8_t out[3 * 16 * 16];
        int small, comp = picture_channels(path, &why);
        if (comp) picture_decode(path, &fs, comp >= 3 ? 3 : 1, out, &small);
#else
        // what ./ddpm import does before it builds anything: read the records, take the
        // network and objective from them, check the weights against the network's plan
        put("fuzz.ref", data, n);
        char path[512];
        snprintf(path, sizeof path, "%s/fuzz.ref", dir);
        exchange_read(&ex, path);
        Config c = {0};
        Objective ob = PAPER_OBJECTIVE;
        if (exchange_config(&ex, &c, &ob, path) & 1) {
            unet_plan(&plan, &c, 1);
            exchange_weights(&ex, &plan, NULL, path);
        }
        int step[2];
        exchange_ints(&ex, "meta.step", step, 2, path);
#endif
    }
    if (net.L) unet_free(&net);
    free(plan.L);
    exchange_free(&ex);
    for (int fd = first_fd; fd < first_fd + 64; fd++) close(fd);   // what a refusal left open
    return 0;
}
