/* Internal: thin wrappers over mbedTLS. */
#ifndef PD_CRYPTO_H
#define PD_CRYPTO_H

#include <stddef.h>
#include <stdint.h>

typedef int (*pd_rng_fn)(void *ctx, unsigned char *buf, size_t len);

#define PD_X25519_LOW_ORDER 1

void pd_wipe(void *p, size_t n);
int pd_ct_equal(const uint8_t *a, const uint8_t *b, size_t n);
int pd_sha256(const uint8_t *in, size_t n, uint8_t out[32]);
int pd_hmac_sha256(const uint8_t *key, size_t key_len, const uint8_t *in, size_t n,
                   uint8_t out[32]);
int pd_hkdf_sha256(const uint8_t *salt, size_t salt_len, const uint8_t *ikm, size_t ikm_len,
                   const char *info, uint8_t *okm, size_t okm_len);
int pd_x25519_base(const uint8_t priv[32], uint8_t pub[32], pd_rng_fn rng, void *rng_ctx);
int pd_x25519(const uint8_t priv[32], const uint8_t peer[32], uint8_t z[32], pd_rng_fn rng,
              void *rng_ctx);
int pd_p256_check(const uint8_t point[65]);
int pd_es256_verify(const uint8_t point[65], const uint8_t *msg, size_t n, const uint8_t sig[64]);
/* out receives n bytes of ciphertext then the 16-byte tag. */
int pd_gcm_seal(const uint8_t key[32], const uint8_t nonce[12], const char *aad, const uint8_t *in,
                size_t n, uint8_t *out);
/* in is ciphertext || tag (n bytes); out receives n - 16 bytes. */
int pd_gcm_open(const uint8_t key[32], const uint8_t nonce[12], const char *aad, const uint8_t *in,
                size_t n, uint8_t *out);

#endif
