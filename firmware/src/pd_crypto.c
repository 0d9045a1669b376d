/* The mbedTLS calls, in one place so a port to another crypto library (or
 * to mbedTLS 3.x, as in ESP-IDF 5) touches only this file. */
#include "pd_crypto.h"

#include <string.h>

#include "mbedtls/ecdsa.h"
#include "mbedtls/ecp.h"
#include "mbedtls/gcm.h"
#include "mbedtls/hkdf.h"
#include "mbedtls/md.h"
#include "mbedtls/sha256.h"
#include "mbedtls/version.h"

#if MBEDTLS_VERSION_NUMBER >= 0x03000000
#define PD_SHA256(in, n, out) mbedtls_sha256((in), (n), (out), 0)
#else
#define PD_SHA256(in, n, out) mbedtls_sha256_ret((in), (n), (out), 0)
#endif

void pd_wipe(void *p, size_t n)
{
    /* volatile so the compiler cannot drop the stores as dead. */
    volatile uint8_t *v = (volatile uint8_t *)p;
    while (n--) {
        *v++ = 0;
    }
}

int pd_ct_equal(const uint8_t *a, const uint8_t *b, size_t n)
{
    uint8_t diff = 0;
    for (size_t i = 0; i < n; i++) {
        diff |= (uint8_t)(a[i] ^ b[i]);
    }
    return diff == 0;
}

int pd_sha256(const uint8_t *in, size_t n, uint8_t out[32])
{
    return PD_SHA256(in, n, out) == 0 ? 0 : -1;
}

int pd_hmac_sha256(const uint8_t *key, size_t key_len, const uint8_t *in, size_t n,
                   uint8_t out[32])
{
    const mbedtls_md_info_t *md = mbedtls_md_info_from_type(MBEDTLS_MD_SHA256);
    return mbedtls_md_hmac(md, key, key_len, in, n, out) == 0 ? 0 : -1;
}

int pd_hkdf_sha256(const uint8_t *salt, size_t salt_len, const uint8_t *ikm, size_t ikm_len,
                   const char *info, uint8_t *okm, size_t okm_len)
{
    const mbedtls_md_info_t *md = mbedtls_md_info_from_type(MBEDTLS_MD_SHA256);
    return mbedtls_hkdf(md, salt, salt_len, ikm, ikm_len, (const unsigned char *)info,
                        strlen(info), okm, okm_len) == 0
               ? 0
               : -1;
}

static int x25519_mul(const uint8_t scalar[32], const uint8_t *point, uint8_t out[32],
                      pd_rng_fn rng, void *rng_ctx)
{
    mbedtls_ecp_group grp;
    mbedtls_ecp_point p, r;
    mbedtls_mpi d;
    uint8_t k[32];
    size_t olen = 0;
    int ret;

    mbedtls_ecp_group_init(&grp);
    mbedtls_ecp_point_init(&p);
    mbedtls_ecp_point_init(&r);
    mbedtls_mpi_init(&d);
    memcpy(k, scalar, 32);
    /* RFC 7748 clamping; mbedTLS refuses unclamped Montgomery scalars. */
    k[0] &= 248;
    k[31] &= 127;
    k[31] |= 64;
    ret = mbedtls_ecp_group_load(&grp, MBEDTLS_ECP_DP_CURVE25519);
    if (ret == 0) ret = mbedtls_mpi_read_binary_le(&d, k, 32);
    if (ret == 0) {
        if (point == NULL) {
            ret = mbedtls_ecp_copy(&p, &grp.G);
        } else {
            /* Reads the u-coordinate little-endian and masks bit 255. */
            ret = mbedtls_ecp_point_read_binary(&grp, &p, point, 32);
        }
    }
    if (ret == 0) ret = mbedtls_ecp_mul(&grp, &r, &d, &p, rng, rng_ctx);
    if (ret == 0) {
        ret = mbedtls_ecp_point_write_binary(&grp, &r, MBEDTLS_ECP_PF_UNCOMPRESSED, &olen, out, 32);
    }
    if (ret == 0 && olen != 32) ret = -1;
    pd_wipe(k, sizeof k);
    mbedtls_mpi_free(&d);
    mbedtls_ecp_point_free(&p);
    mbedtls_ecp_point_free(&r);
    mbedtls_ecp_group_free(&grp);
    return ret == 0 ? 0 : -1;
}

int pd_x25519_base(const uint8_t priv[32], uint8_t pub[32], pd_rng_fn rng, void *rng_ctx)
{
    return x25519_mul(priv, NULL, pub, rng, rng_ctx);
}

int pd_x25519(const uint8_t priv[32], const uint8_t peer[32], uint8_t z[32], pd_rng_fn rng,
              void *rng_ctx)
{
    static const uint8_t zero[32];
    int ret = x25519_mul(priv, peer, z, rng, rng_ctx);
    if (ret != 0) {
        /* mbedTLS refuses some low-order inputs outright (the result is the
         * point at infinity); either way there is no usable Z. */
        pd_wipe(z, 32);
        return PD_X25519_LOW_ORDER;
    }
    /* A low-order peer key yields Z = 0, which would make every session key
     * public knowledge. */
    if (pd_ct_equal(z, zero, 32)) {
        return PD_X25519_LOW_ORDER;
    }
    return 0;
}

int pd_p256_check(const uint8_t point[65])
{
    mbedtls_ecp_group grp;
    mbedtls_ecp_point q;
    int ret;
    mbedtls_ecp_group_init(&grp);
    mbedtls_ecp_point_init(&q);
    ret = mbedtls_ecp_group_load(&grp, MBEDTLS_ECP_DP_SECP256R1);
    if (ret == 0) ret = mbedtls_ecp_point_read_binary(&grp, &q, point, 65);
    /* On the curve, not infinity: the invalid-curve attack starts here. */
    if (ret == 0) ret = mbedtls_ecp_check_pubkey(&grp, &q);
    mbedtls_ecp_point_free(&q);
    mbedtls_ecp_group_free(&grp);
    return ret == 0 ? 0 : -1;
}

int pd_es256_verify(const uint8_t point[65], const uint8_t *msg, size_t n, const uint8_t sig[64])
{
    mbedtls_ecp_group grp;
    mbedtls_ecp_point q;
    mbedtls_mpi r, s;
    uint8_t hash[32];
    int ret;
    mbedtls_ecp_group_init(&grp);
    mbedtls_ecp_point_init(&q);
    mbedtls_mpi_init(&r);
    mbedtls_mpi_init(&s);
    ret = pd_sha256(msg, n, hash);
    if (ret == 0) ret = mbedtls_ecp_group_load(&grp, MBEDTLS_ECP_DP_SECP256R1);
    if (ret == 0) ret = mbedtls_ecp_point_read_binary(&grp, &q, point, 65);
    if (ret == 0) ret = mbedtls_mpi_read_binary(&r, sig, 32);
    if (ret == 0) ret = mbedtls_mpi_read_binary(&s, sig + 32, 32);
    /* Range checks of r and s (1..n-1) are inside mbedtls_ecdsa_verify. */
    if (ret == 0) ret = mbedtls_ecdsa_verify(&grp, hash, sizeof hash, &q, &r, &s);
    mbedtls_mpi_free(&r);
    mbedtls_mpi_free(&s);
    mbedtls_ecp_point_free(&q);
    mbedtls_ecp_group_free(&grp);
    return ret == 0 ? 0 : -1;
}

/* AES-256-GCM with the 16-byte tag after the text, one context set up and
 * freed the same way both ways. Sealing: `in` is n bytes, `out` gets n + 16.
 * Opening: `in` is n bytes with the tag, `out` gets n - 16, wiped unless the
 * tag verifies (no unauthenticated plaintext is left behind). */
static int gcm(int seal, const uint8_t key[32], const uint8_t nonce[12], const char *aad,
               const uint8_t *in, size_t n, uint8_t *out)
{
    mbedtls_gcm_context gcm;
    int ret;
    if (!seal && n < 16) return -1;
    mbedtls_gcm_init(&gcm);
    ret = mbedtls_gcm_setkey(&gcm, MBEDTLS_CIPHER_ID_AES, key, 256);
    if (ret == 0 && seal) {
        ret = mbedtls_gcm_crypt_and_tag(&gcm, MBEDTLS_GCM_ENCRYPT, n, nonce, 12,
                                        (const unsigned char *)aad, strlen(aad), in, out, 16,
                                        out + n);
    } else if (ret == 0) {
        ret = mbedtls_gcm_auth_decrypt(&gcm, n - 16, nonce, 12, (const unsigned char *)aad,
                                       strlen(aad), in + n - 16, 16, in, out);
    }
    mbedtls_gcm_free(&gcm);
    if (ret != 0 && !seal) pd_wipe(out, n - 16);
    return ret == 0 ? 0 : -1;
}

int pd_gcm_seal(const uint8_t key[32], const uint8_t nonce[12], const char *aad, const uint8_t *in,
                size_t n, uint8_t *out)
{
    return gcm(1, key, nonce, aad, in, n, out);
}

int pd_gcm_open(const uint8_t key[32], const uint8_t nonce[12], const char *aad, const uint8_t *in,
                size_t n, uint8_t *out)
{
    return gcm(0, key, nonce, aad, in, n, out);
}
