#include "pd_test.h"

#include <string.h>

#include "mbedtls/ecdsa.h"
#include "mbedtls/version.h"
#include "pd_crypto.h"

int pd_test_failures;

char *pd_test_read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    char *buf;
    long n;
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    n = ftell(f);
    fseek(f, 0, SEEK_SET);
    buf = malloc((size_t)n + 1);
    if (buf && fread(buf, 1, (size_t)n, f) != (size_t)n) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    if (buf) {
        buf[n] = '\0';
        *len = (size_t)n;
    }
    return buf;
}

static int hexv(char c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

long pd_test_hex(const char *hex, uint8_t *out, size_t cap)
{
    size_t n = strlen(hex);
    if (n % 2 || n / 2 > cap) return -1;
    for (size_t i = 0; i < n / 2; i++) {
        int hi = hexv(hex[2 * i]), lo = hexv(hex[2 * i + 1]);
        if (hi < 0 || lo < 0) return -1;
        out[i] = (uint8_t)(hi << 4 | lo);
    }
    return (long)(n / 2);
}

int pd_test_get(pd_json_span_t doc, const char *path, pd_json_span_t *out)
{
    char part[64];
    pd_json_span_t cur = doc;
    while (*path) {
        const char *dot = strchr(path, '.');
        size_t n = dot ? (size_t)(dot - path) : strlen(path);
        if (n >= sizeof part) return -1;
        memcpy(part, path, n);
        part[n] = '\0';
        if (pd_json_type(cur) == PD_JSON_ARRAY) {
            long idx = atol(part);
            const char *pos = NULL;
            pd_json_span_t el;
            int r;
            while ((r = pd_json_next_element(cur, &pos, &el)) == 1 && idx > 0) idx--;
            if (r != 1) return -1;
            cur = el;
        } else if (pd_json_get(cur, part, &cur) != 1) {
            return -1;
        }
        path += n;
        if (*path == '.') path++;
    }
    *out = cur;
    return 0;
}

const char *pd_test_str(pd_json_span_t doc, const char *path, char *buf, size_t cap)
{
    pd_json_span_t v;
    if (pd_test_get(doc, path, &v) != 0 || pd_json_string(v, buf, cap, NULL) != 0) {
        fprintf(stderr, "vector path %s missing\n", path);
        exit(2);
    }
    return buf;
}

int64_t pd_test_int(pd_json_span_t doc, const char *path)
{
    pd_json_span_t v;
    int64_t x;
    if (pd_test_get(doc, path, &v) != 0 || pd_json_int(v, &x) != 0) {
        fprintf(stderr, "vector path %s missing\n", path);
        exit(2);
    }
    return x;
}

int pd_test_hex_at(pd_json_span_t doc, const char *path, uint8_t *out, size_t cap)
{
    static char buf[8192];
    return (int)pd_test_hex(pd_test_str(doc, path, buf, sizeof buf), out, cap);
}

int pd_test_random(void *ctx, uint8_t *buf, size_t len)
{
    static FILE *f;
    (void)ctx;
    if (!f) f = fopen("/dev/urandom", "rb");
    return f && fread(buf, 1, len, f) == len ? 0 : -1;
}

int64_t pd_test_now(void *ctx)
{
    return *(int64_t *)ctx;
}

static size_t signing_input(const char *kid, const char *alg, const char *claims, char *out,
                            size_t cap)
{
    char header[160];
    int hn = snprintf(header, sizeof header, "{\"alg\":\"%s\",\"kid\":\"%s\",\"typ\":\"JWT\"}", alg, kid);
    size_t a = pd_b64url_encode((const uint8_t *)header, (size_t)hn, out, cap);
    size_t b;
    if (!a || a + 2 > cap) return 0;
    out[a] = '.';
    b = pd_b64url_encode((const uint8_t *)claims, strlen(claims), out + a + 1, cap - a - 1);
    return b ? a + 1 + b : 0;
}

size_t pd_test_hs256_grant(const uint8_t *key, size_t key_len, const char *kid, const char *claims,
                           char *out, size_t cap)
{
    uint8_t mac[32];
    size_t n = signing_input(kid, "HS256", claims, out, cap), s;
    if (!n || n + 2 > cap) return 0;
    pd_hmac_sha256(key, key_len, (const uint8_t *)out, n, mac);
    out[n] = '.';
    s = pd_b64url_encode(mac, 32, out + n + 1, cap - n - 1);
    return s ? n + 1 + s : 0;
}

static int rng(void *ctx, unsigned char *buf, size_t len)
{
    return pd_test_random(ctx, buf, len);
}

size_t pd_test_es256_grant(const uint8_t priv[32], const char *kid, const char *claims, char *out,
                           size_t cap)
{
    mbedtls_ecp_group grp;
    mbedtls_mpi d, r, s;
    uint8_t hash[32], sig[64];
    size_t n = signing_input(kid, "ES256", claims, out, cap), sl;
    int ret;
    if (!n || n + 2 > cap) return 0;
    mbedtls_ecp_group_init(&grp);
    mbedtls_mpi_init(&d);
    mbedtls_mpi_init(&r);
    mbedtls_mpi_init(&s);
    pd_sha256((const uint8_t *)out, n, hash);
    ret = mbedtls_ecp_group_load(&grp, MBEDTLS_ECP_DP_SECP256R1);
    if (!ret) ret = mbedtls_mpi_read_binary(&d, priv, 32);
    if (!ret) ret = mbedtls_ecdsa_sign(&grp, &r, &s, &d, hash, 32, rng, NULL);
    if (!ret) ret = mbedtls_mpi_write_binary(&r, sig, 32);
    if (!ret) ret = mbedtls_mpi_write_binary(&s, sig + 32, 32);
    mbedtls_ecp_group_free(&grp);
    mbedtls_mpi_free(&d);
    mbedtls_mpi_free(&r);
    mbedtls_mpi_free(&s);
    if (ret) return 0;
    out[n] = '.';
    sl = pd_b64url_encode(sig, 64, out + n + 1, cap - n - 1);
    return sl ? n + 1 + sl : 0;
}

int pd_test_done(const char *name)
{
    if (pd_test_failures) {
        fprintf(stderr, "%s: %d check(s) failed\n", name, pd_test_failures);
        return 1;
    }
    printf("%s: all checks passed\n", name);
    return 0;
}
