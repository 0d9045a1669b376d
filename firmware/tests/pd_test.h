#ifndef PD_TEST_H
#define PD_TEST_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "pd_codec.h"
#include "pd_device.h"

extern int pd_test_failures;

#define CHECK(cond)                                                                    \
    do {                                                                               \
        if (!(cond)) {                                                                 \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);   \
            pd_test_failures++;                                                        \
        }                                                                              \
    } while (0)

#define CHECK_EQ_INT(a, b)                                                             \
    do {                                                                               \
        long long _a = (long long)(a), _b = (long long)(b);                            \
        if (_a != _b) {                                                                \
            fprintf(stderr, "%s:%d: %s == %lld, expected %lld\n", __FILE__, __LINE__,  \
                    #a, _a, _b);                                                       \
            pd_test_failures++;                                                        \
        }                                                                              \
    } while (0)

char *pd_test_read_file(const char *path, size_t *len);
/* Decode hex into out; returns the byte count, or -1. */
long pd_test_hex(const char *hex, uint8_t *out, size_t cap);
/* Follow a path of object keys ("a.b.c"); numeric parts index arrays. */
int pd_test_get(pd_json_span_t doc, const char *path, pd_json_span_t *out);
/* The string at path, into a static buffer per call slot. */
const char *pd_test_str(pd_json_span_t doc, const char *path, char *buf, size_t cap);
int64_t pd_test_int(pd_json_span_t doc, const char *path);
int pd_test_hex_at(pd_json_span_t doc, const char *path, uint8_t *out, size_t cap);

int pd_test_random(void *ctx, uint8_t *buf, size_t len);
/* A fixed clock: ctx points at an int64_t. */
int64_t pd_test_now(void *ctx);

/* An HS256 grant over these claims (JSON text), signed with key. */
size_t pd_test_hs256_grant(const uint8_t *key, size_t key_len, const char *kid, const char *claims,
                           char *out, size_t cap);
size_t pd_test_es256_grant(const uint8_t priv[32], const char *kid, const char *claims, char *out,
                           size_t cap);

int pd_test_done(const char *name);

#endif
