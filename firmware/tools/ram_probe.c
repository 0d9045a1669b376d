/* Measures what firmware/README.md documents: the size of the library's
 * state, the peak heap mbedTLS takes inside each call (the library itself
 * never allocates), and the peak stack of each call.
 *
 * Linked statically against libmbedcrypto.a with --wrap=calloc/free, so
 * every allocation mbedTLS makes passes through the counters below. Stack:
 * each call runs on a thread whose stack we painted, scanned afterwards. */
#define _POSIX_C_SOURCE 200809L

#include <pthread.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pd_device.h"
#include "pd_gatt.h"
#include "pd_mqtt.h"
#include "pd_crypto.h"
#include "pd_test.h"

void *__real_calloc(size_t n, size_t size);
void __real_free(void *p);
void *__wrap_calloc(size_t n, size_t size);
void __wrap_free(void *p);

static size_t heap_now, heap_peak;
/* Keeps the returned blocks 16-byte aligned, as malloc's are. */
#define PD_HDR 16

/* A size header in front of each block, so free knows how much goes. */
void *__wrap_calloc(size_t n, size_t size)
{
    size_t total = n * size;
    size_t *p = __real_calloc(1, total + PD_HDR);
    if (!p) return NULL;
    *p = total;
    heap_now += total;
    if (heap_now > heap_peak) heap_peak = heap_now;
    return (char *)p + PD_HDR;
}

void __wrap_free(void *p)
{
    size_t *h;
    if (!p) return;
    h = (size_t *)((char *)p - PD_HDR);
    heap_now -= *h;
    __real_free(h);
}

#define STACK_SIZE (256 * 1024)
static uint8_t thread_stack[STACK_SIZE] __attribute__((aligned(64)));

typedef struct {
    void (*fn)(void *);
    void *arg;
} job_t;

static void *trampoline(void *p)
{
    job_t *job = p;
    job->fn(job->arg);
    return NULL;
}

/* Run fn on a painted stack of our own; returns the bytes it touched
 * (thread start-up included, a few hundred bytes). */
static size_t run_on_painted_stack(void (*fn)(void *), void *arg)
{
    pthread_t t;
    pthread_attr_t attr;
    job_t job = {fn, arg};
    size_t i = 0;
    memset(thread_stack, 0xA5, sizeof thread_stack);
    pthread_attr_init(&attr);
    pthread_attr_setstack(&attr, thread_stack, sizeof thread_stack);
    if (pthread_create(&t, &attr, trampoline, &job) != 0) abort();
    pthread_join(t, NULL);
    pthread_attr_destroy(&attr);
    /* The stack grows down: the lowest byte no longer painted is the peak. */
    while (i < sizeof thread_stack && thread_stack[i] == 0xA5) i++;
    return sizeof thread_stack - i;
}

typedef struct {
    const char *name;
    size_t heap, stack;
} row_t;

static row_t rows[16];
static int nrows;

static int result;

#define MEASURE(label, call)                                                  \
    do {                                                                      \
        heap_now = heap_peak = 0;                                             \
        rows[nrows].stack = run_on_painted_stack(call, NULL);                 \
        rows[nrows].heap = heap_peak;                                         \
        rows[nrows++].name = (label);                                         \
    } while (0)

static int64_t NOW;
static pd_device_t dev;
static pd_gatt_t gatt;
static pd_config_t cfg;
static pd_key_t key;
static pd_json_span_t jwk;
static pd_grant_info_t info;
static pd_wifi_credentials_t creds;
static char blob[2100];
static uint8_t out[256], msg[200];
static size_t ol, msg_len;

static void do_nothing(void *a) { (void)a; }
static void do_pin(void *a) { (void)a; result |= pd_key_from_jwk(&key, jwk.start, (size_t)(jwk.end - jwk.start)); }
static void do_init(void *a) { (void)a; result |= pd_device_init(&dev, &cfg, &key, NULL); }
static void do_grant(void *a) { (void)a; result |= pd_accept_grant(&dev, blob, strlen(blob), &info); }
static void do_status(void *a) { (void)a; result |= pd_status_message(&dev, NULL, out, sizeof out, &ol); }
static void do_creds(void *a) { (void)a; result |= pd_receive_credentials(&dev, msg, msg_len, &creds); }
static void do_finish(void *a) { (void)a; result |= pd_finish(&dev, 1, NULL, out, sizeof out, &ol); }

static void do_gatt_grant(void *a)
{
    pd_gatt_result_t res;
    uint8_t frame[600];
    size_t n, len = strlen(blob);
    (void)a;
    for (size_t i = 0; (n = pd_data_frame((const uint8_t *)blob, len, 517, i, frame, sizeof frame)); i++) {
        pd_gatt_write_grant(&gatt, frame, n, &res);
    }
    pd_commit_frame((const uint8_t *)blob, len, frame);
    pd_gatt_write_grant(&gatt, frame, 3 + PD_DIGEST_LEN, &res);
    result |= res.status_len == 0 || res.status[0] != PD_STATUS_SEALED;
}

int main(int argc, char **argv)
{
    pd_json_span_t v;
    char *text;
    size_t len;
    if (argc < 2 || !(text = pd_test_read_file(argv[1], &len)) || pd_json_parse(text, len, &v) != 0) {
        fprintf(stderr, "usage: ram_probe wifi-grant-v1.json\n");
        return 2;
    }
    NOW = pd_test_int(v, "grant.claims.iat") + 60;
    cfg.device_id = 42;
    cfg.capabilities = 2;
    pd_test_hex_at(v, "keys.device_x25519_private", cfg.private_key, 32);
    cfg.has_clock = 1;
    cfg.leeway = 30;
    cfg.now = pd_test_now;
    cfg.random = pd_test_random;
    cfg.ctx = &NOW;
    pd_test_get(v, "es256.gateway_jwk", &jwk);
    pd_test_str(v, "es256.blob", blob, sizeof blob);

    MEASURE("baseline: thread start, empty call", do_nothing);
    MEASURE("pd_key_from_jwk (ES256 key, on-curve check)", do_pin);
    MEASURE("pd_device_init (X25519 public key)", do_init);
    {
        uint8_t nonce[16];
        pd_test_hex_at(v, "device.nonce", nonce, 16);
        pd_device_set_nonce(&dev, nonce);
    }
    MEASURE("pd_accept_grant (ES256, X25519, HKDF)", do_grant);
    MEASURE("pd_status_message (AES-GCM seal)", do_status);
    {
        /* A credential message under this grant's K_up. */
        static const char plain[] = "{\"ssid\":\"provisiond-lab\",\"password\":\"correct horse battery staple\",\"security\":\"wpa2-psk\"}";
        uint8_t nonce[12] = {1};
        memcpy(msg, nonce, 12);
        pd_gcm_seal(dev.session.k_up, nonce, "provisiond wifi-credential v1", (const uint8_t *)plain,
                    strlen(plain), msg + 12);
        msg_len = 12 + strlen(plain) + 16;
    }
    MEASURE("pd_receive_credentials (AES-GCM open, JSON)", do_creds);
    MEASURE("pd_finish", do_finish);
    /* The same grant again, through the GATT glue, on a fresh device. */
    pd_device_deinit(&dev);
    do_init(NULL);
    {
        uint8_t nonce[16];
        pd_test_hex_at(v, "device.nonce", nonce, 16);
        pd_device_set_nonce(&dev, nonce);
    }
    pd_gatt_init(&gatt, &dev);
    MEASURE("pd_gatt_write_grant (frames + accept + seal)", do_gatt_grant);
    if (result != 0) {
        fprintf(stderr, "a measured call failed\n");
        return 1;
    }
    printf("sizeof(pd_device_t) %zu\n", sizeof(pd_device_t));
    printf("sizeof(pd_gatt_t) %zu\n", sizeof(pd_gatt_t));
    printf("sizeof(pd_freshness_t) %zu\n", sizeof(pd_freshness_t));
    printf("sizeof(pd_key_t) %zu\n", sizeof(pd_key_t));
    for (int i = 0; i < nrows; i++) {
        printf("call %-48s heap %6zu stack %6zu\n", rows[i].name, rows[i].heap, rows[i].stack);
    }
    /* text stays: it came from the unwrapped malloc, so our free must not see it. */
    return 0;
}
