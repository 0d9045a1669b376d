/* base64url and a small, bounded JSON reader: the text codecs every other
 * part of the library is built on. No allocation; nothing is copied except
 * into buffers the caller passes in. */
#ifndef PD_CODEC_H
#define PD_CODEC_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Nesting deeper than this is refused, so a hostile document cannot exhaust
 * the stack of the recursive value skipper. */
#define PD_JSON_MAX_DEPTH 8

/* Length of the base64url text (no padding) for `n` bytes. */
#define PD_B64URL_LEN(n) ((((n) / 3) * 4) + (((n) % 3) ? ((n) % 3) + 1 : 0))

/* Writes the text and a terminating NUL; returns its length, or 0 if `cap`
 * is too small (also when n == 0, which no caller needs). */
size_t pd_b64url_encode(const uint8_t *in, size_t n, char *out, size_t cap);

/* Strict decode: no padding, no whitespace, url alphabet only, canonical
 * trailing bits. Returns 0 and sets *out_len, or -1. */
int pd_b64url_decode(const char *in, size_t n, uint8_t *out, size_t cap, size_t *out_len);

/* Nonzero if [s, s+n) is well-formed UTF-8 (no overlongs, no surrogates). */
int pd_utf8_valid(const uint8_t *s, size_t n);

typedef enum {
    PD_JSON_INVALID = 0,
    PD_JSON_OBJECT,
    PD_JSON_ARRAY,
    PD_JSON_STRING,
    PD_JSON_NUMBER,
    PD_JSON_TRUE,
    PD_JSON_FALSE,
    PD_JSON_NULL
} pd_json_type_t;

/* A value inside a document: [start, end) of the original text. */
typedef struct {
    const char *start;
    const char *end;
} pd_json_span_t;

pd_json_type_t pd_json_type(pd_json_span_t v);

/* Whole document: one value with only whitespace around it. */
int pd_json_parse(const char *s, size_t n, pd_json_span_t *out);

/* Iterate an object's members: start with *pos = NULL. Returns 1 with key
 * (the raw string token, quotes included) and value, 0 at the end, -1 on a
 * syntax error. */
int pd_json_next_member(pd_json_span_t obj, const char **pos, pd_json_span_t *key,
                        pd_json_span_t *value);

/* Iterate an array's elements the same way. */
int pd_json_next_element(pd_json_span_t arr, const char **pos, pd_json_span_t *value);

/* Compare a raw key token with a plain ASCII name (escapes are decoded). */
int pd_json_key_is(pd_json_span_t key, const char *name);

/* The member named `name`: 1 found, 0 absent, -1 syntax error or the name
 * appears twice (where parsers disagree, we refuse). */
int pd_json_get(pd_json_span_t obj, const char *name, pd_json_span_t *value);

/* Nonzero if no key appears twice. */
int pd_json_keys_unique(pd_json_span_t obj);

/* Decode a string value (escapes, \u surrogate pairs) into UTF-8 plus NUL.
 * Returns 0, or -1 if not a string, malformed, or larger than cap - 1. */
int pd_json_string(pd_json_span_t v, char *out, size_t cap, size_t *out_len);

/* An integer value (no fraction, no exponent) that fits int64. 0 or -1. */
int pd_json_int(pd_json_span_t v, int64_t *out);

/* Any number, as a double (heartbeat intervals may be fractional). */
int pd_json_number(pd_json_span_t v, double *out);

#ifdef __cplusplus
}
#endif
#endif
