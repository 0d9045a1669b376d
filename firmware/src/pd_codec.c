#include "pd_codec.h"

#include <stdlib.h>
#include <string.h>

static const char B64URL[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

size_t pd_b64url_encode(const uint8_t *in, size_t n, char *out, size_t cap)
{
    size_t need = PD_B64URL_LEN(n);
    size_t i, o = 0;
    if (n == 0 || need + 1 > cap) {
        return 0;
    }
    for (i = 0; i + 2 < n; i += 3) {
        uint32_t v = ((uint32_t)in[i] << 16) | ((uint32_t)in[i + 1] << 8) | in[i + 2];
        out[o++] = B64URL[(v >> 18) & 63];
        out[o++] = B64URL[(v >> 12) & 63];
        out[o++] = B64URL[(v >> 6) & 63];
        out[o++] = B64URL[v & 63];
    }
    if (n - i == 1) {
        uint32_t v = (uint32_t)in[i] << 16;
        out[o++] = B64URL[(v >> 18) & 63];
        out[o++] = B64URL[(v >> 12) & 63];
    } else if (n - i == 2) {
        uint32_t v = ((uint32_t)in[i] << 16) | ((uint32_t)in[i + 1] << 8);
        out[o++] = B64URL[(v >> 18) & 63];
        out[o++] = B64URL[(v >> 12) & 63];
        out[o++] = B64URL[(v >> 6) & 63];
    }
    out[o] = '\0';
    return o;
}

static int b64url_value(char c)
{
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '-') return 62;
    if (c == '_') return 63;
    return -1;
}

int pd_b64url_decode(const char *in, size_t n, uint8_t *out, size_t cap, size_t *out_len)
{
    size_t i, o = 0;
    uint32_t acc = 0;
    int bits = 0;
    size_t need = (n / 4) * 3 + ((n % 4) ? (n % 4) - 1 : 0);
    if (n % 4 == 1 || need > cap) {
        return -1;
    }
    for (i = 0; i < n; i++) {
        int v = b64url_value(in[i]);
        if (v < 0) {
            return -1;
        }
        acc = (acc << 6) | (uint32_t)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            out[o++] = (uint8_t)(acc >> bits);
            acc &= (1u << bits) - 1u;
        }
    }
    /* Leftover bits must be zero, or two spellings would decode alike and a
     * signed blob could be re-spelled unnoticed. */
    if (acc != 0) {
        return -1;
    }
    *out_len = o;
    return 0;
}

int pd_utf8_valid(const uint8_t *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        uint8_t c = s[i];
        size_t len;
        uint32_t cp;
        if (c < 0x80) {
            i++;
            continue;
        } else if ((c & 0xE0) == 0xC0) {
            len = 2;
            cp = c & 0x1F;
        } else if ((c & 0xF0) == 0xE0) {
            len = 3;
            cp = c & 0x0F;
        } else if ((c & 0xF8) == 0xF0) {
            len = 4;
            cp = c & 0x07;
        } else {
            return 0;
        }
        if (i + len > n) {
            return 0;
        }
        for (size_t k = 1; k < len; k++) {
            if ((s[i + k] & 0xC0) != 0x80) {
                return 0;
            }
            cp = (cp << 6) | (s[i + k] & 0x3F);
        }
        if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) ||
            cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
            return 0;
        }
        i += len;
    }
    return 1;
}

/* ------------------------------------------------------------------ JSON */

static const char *skip_ws(const char *p, const char *end)
{
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')) {
        p++;
    }
    return p;
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* p at the opening quote; returns the position after the closing quote. */
static const char *skip_string(const char *p, const char *end)
{
    p++;
    while (p < end) {
        unsigned char c = (unsigned char)*p;
        if (c == '"') {
            return p + 1;
        }
        if (c < 0x20) {
            return NULL;
        }
        if (c == '\\') {
            p++;
            if (p >= end) {
                return NULL;
            }
            if (*p == 'u') {
                if (end - p < 5) {
                    return NULL;
                }
                for (int k = 1; k <= 4; k++) {
                    if (hexval(p[k]) < 0) {
                        return NULL;
                    }
                }
                p += 5;
                continue;
            }
            if (!strchr("\"\\/bfnrt", *p) || *p == '\0') {
                return NULL;
            }
        }
        p++;
    }
    return NULL;
}

static const char *skip_number(const char *p, const char *end)
{
    const char *start;
    if (p < end && *p == '-') {
        p++;
    }
    if (p >= end) {
        return NULL;
    }
    if (*p == '0') {
        p++;
    } else if (*p >= '1' && *p <= '9') {
        while (p < end && *p >= '0' && *p <= '9') p++;
    } else {
        return NULL;
    }
    if (p < end && *p == '.') {
        p++;
        start = p;
        while (p < end && *p >= '0' && *p <= '9') p++;
        if (p == start) return NULL;
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        p++;
        if (p < end && (*p == '+' || *p == '-')) p++;
        start = p;
        while (p < end && *p >= '0' && *p <= '9') p++;
        if (p == start) return NULL;
    }
    return p;
}

static const char *skip_value(const char *p, const char *end, int depth);

static const char *skip_container(const char *p, const char *end, int depth, char close)
{
    int first = 1;
    if (depth >= PD_JSON_MAX_DEPTH) {
        return NULL;
    }
    p = skip_ws(p + 1, end);
    if (p < end && *p == close) {
        return p + 1;
    }
    for (;;) {
        if (!first) {
            p = skip_ws(p, end);
            if (p >= end) return NULL;
            if (*p == close) return p + 1;
            if (*p != ',') return NULL;
            p = skip_ws(p + 1, end);
        }
        first = 0;
        if (close == '}') {
            if (p >= end || *p != '"') return NULL;
            p = skip_string(p, end);
            if (!p) return NULL;
            p = skip_ws(p, end);
            if (p >= end || *p != ':') return NULL;
            p = skip_ws(p + 1, end);
        }
        p = skip_value(p, end, depth + 1);
        if (!p) return NULL;
    }
}

static const char *skip_value(const char *p, const char *end, int depth)
{
    if (p >= end) {
        return NULL;
    }
    switch (*p) {
    case '{':
        return skip_container(p, end, depth, '}');
    case '[':
        return skip_container(p, end, depth, ']');
    case '"':
        return skip_string(p, end);
    case 't':
        return (end - p >= 4 && memcmp(p, "true", 4) == 0) ? p + 4 : NULL;
    case 'f':
        return (end - p >= 5 && memcmp(p, "false", 5) == 0) ? p + 5 : NULL;
    case 'n':
        return (end - p >= 4 && memcmp(p, "null", 4) == 0) ? p + 4 : NULL;
    default:
        return skip_number(p, end);
    }
}

pd_json_type_t pd_json_type(pd_json_span_t v)
{
    if (!v.start || v.start >= v.end) return PD_JSON_INVALID;
    switch (*v.start) {
    case '{': return PD_JSON_OBJECT;
    case '[': return PD_JSON_ARRAY;
    case '"': return PD_JSON_STRING;
    case 't': return PD_JSON_TRUE;
    case 'f': return PD_JSON_FALSE;
    case 'n': return PD_JSON_NULL;
    default: return PD_JSON_NUMBER;
    }
}

int pd_json_parse(const char *s, size_t n, pd_json_span_t *out)
{
    const char *end = s + n;
    const char *p = skip_ws(s, end);
    const char *v = skip_value(p, end, 0);
    if (!v || skip_ws(v, end) != end) {
        return -1;
    }
    out->start = p;
    out->end = v;
    return 0;
}

/* Shared by member and element iteration: the document was validated by
 * pd_json_parse, but we re-check as we go so a span from elsewhere is safe. */
static int next_item(pd_json_span_t c, const char **pos, pd_json_span_t *key, pd_json_span_t *value,
                     char open, char close)
{
    const char *p, *end = c.end;
    if (c.start >= end || *c.start != open) return -1;
    if (*pos == NULL) {
        p = skip_ws(c.start + 1, end);
        if (p < end && *p == close) {
            *pos = p;
            return 0;
        }
    } else {
        p = skip_ws(*pos, end);
        if (p >= end) return -1;
        if (*p == close) return 0;
        if (*p != ',') return -1;
        p = skip_ws(p + 1, end);
    }
    if (key) {
        const char *k = p;
        if (p >= end || *p != '"') return -1;
        p = skip_string(p, end);
        if (!p) return -1;
        key->start = k;
        key->end = p;
        p = skip_ws(p, end);
        if (p >= end || *p != ':') return -1;
        p = skip_ws(p + 1, end);
    }
    value->start = p;
    value->end = skip_value(p, end, 1);
    if (!value->end) return -1;
    *pos = value->end;
    return 1;
}

int pd_json_next_member(pd_json_span_t obj, const char **pos, pd_json_span_t *key,
                        pd_json_span_t *value)
{
    return next_item(obj, pos, key, value, '{', '}');
}

int pd_json_next_element(pd_json_span_t arr, const char **pos, pd_json_span_t *value)
{
    return next_item(arr, pos, NULL, value, '[', ']');
}

static int put_utf8(uint32_t cp, char *out, size_t cap, size_t *o)
{
    uint8_t buf[4];
    size_t n;
    if (cp < 0x80) {
        buf[0] = (uint8_t)cp;
        n = 1;
    } else if (cp < 0x800) {
        buf[0] = (uint8_t)(0xC0 | (cp >> 6));
        buf[1] = (uint8_t)(0x80 | (cp & 0x3F));
        n = 2;
    } else if (cp < 0x10000) {
        buf[0] = (uint8_t)(0xE0 | (cp >> 12));
        buf[1] = (uint8_t)(0x80 | ((cp >> 6) & 0x3F));
        buf[2] = (uint8_t)(0x80 | (cp & 0x3F));
        n = 3;
    } else {
        buf[0] = (uint8_t)(0xF0 | (cp >> 18));
        buf[1] = (uint8_t)(0x80 | ((cp >> 12) & 0x3F));
        buf[2] = (uint8_t)(0x80 | ((cp >> 6) & 0x3F));
        buf[3] = (uint8_t)(0x80 | (cp & 0x3F));
        n = 4;
    }
    if (*o + n + 1 > cap) return -1;
    memcpy(out + *o, buf, n);
    *o += n;
    return 0;
}

static uint32_t hex4(const char *p)
{
    return (uint32_t)(hexval(p[0]) << 12 | hexval(p[1]) << 8 | hexval(p[2]) << 4 | hexval(p[3]));
}

int pd_json_string(pd_json_span_t v, char *out, size_t cap, size_t *out_len)
{
    const char *p, *end;
    size_t o = 0;
    if (pd_json_type(v) != PD_JSON_STRING || cap == 0 || skip_string(v.start, v.end) != v.end) {
        return -1;
    }
    p = v.start + 1;
    end = v.end - 1;
    while (p < end) {
        if (*p != '\\') {
            if (o + 2 > cap) return -1;
            out[o++] = *p++;
            continue;
        }
        p++;
        switch (*p) {
        case 'u': {
            uint32_t cp = hex4(p + 1);
            p += 5;
            if (cp >= 0xDC00 && cp <= 0xDFFF) return -1; /* a lone low surrogate */
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                uint32_t lo;
                if (end - p < 6 || p[0] != '\\' || p[1] != 'u') return -1;
                lo = hex4(p + 2);
                if (lo < 0xDC00 || lo > 0xDFFF) return -1;
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                p += 6;
            }
            if (put_utf8(cp, out, cap, &o) != 0) return -1;
            continue;
        }
        case 'b': if (put_utf8('\b', out, cap, &o)) return -1; break;
        case 'f': if (put_utf8('\f', out, cap, &o)) return -1; break;
        case 'n': if (put_utf8('\n', out, cap, &o)) return -1; break;
        case 'r': if (put_utf8('\r', out, cap, &o)) return -1; break;
        case 't': if (put_utf8('\t', out, cap, &o)) return -1; break;
        default: if (put_utf8((uint8_t)*p, out, cap, &o)) return -1; break;
        }
        p++;
    }
    out[o] = '\0';
    if (out_len) *out_len = o;
    return 0;
}

int pd_json_key_is(pd_json_span_t key, const char *name)
{
    char buf[64];
    size_t len;
    /* Fast path: the usual unescaped key. */
    size_t raw = (size_t)(key.end - key.start);
    size_t nl = strlen(name);
    if (raw == nl + 2 && memcmp(key.start + 1, name, nl) == 0) {
        return 1;
    }
    if (pd_json_string(key, buf, sizeof buf, &len) != 0) {
        return 0;
    }
    return len == nl && memcmp(buf, name, nl) == 0;
}

static int keys_equal(pd_json_span_t a, pd_json_span_t b)
{
    char x[64], y[64];
    size_t xl, yl;
    int ra = pd_json_string(a, x, sizeof x, &xl);
    int rb = pd_json_string(b, y, sizeof y, &yl);
    if (ra != 0 || rb != 0) {
        /* Keys too long for the buffer: compare raw spellings. */
        return (a.end - a.start) == (b.end - b.start) &&
               memcmp(a.start, b.start, (size_t)(a.end - a.start)) == 0;
    }
    return xl == yl && memcmp(x, y, xl) == 0;
}

int pd_json_keys_unique(pd_json_span_t obj)
{
    const char *p = NULL;
    pd_json_span_t k, v;
    int r;
    while ((r = pd_json_next_member(obj, &p, &k, &v)) == 1) {
        const char *q = p;
        pd_json_span_t k2, v2;
        int r2;
        while ((r2 = pd_json_next_member(obj, &q, &k2, &v2)) == 1) {
            if (keys_equal(k, k2)) return 0;
        }
        if (r2 < 0) return 0;
    }
    return r == 0;
}

int pd_json_get(pd_json_span_t obj, const char *name, pd_json_span_t *value)
{
    const char *p = NULL;
    pd_json_span_t k, v;
    int r, found = 0;
    if (pd_json_type(obj) != PD_JSON_OBJECT) return -1;
    while ((r = pd_json_next_member(obj, &p, &k, &v)) == 1) {
        if (pd_json_key_is(k, name)) {
            if (found) return -1;
            found = 1;
            *value = v;
        }
    }
    if (r < 0) return -1;
    return found;
}

int pd_json_int(pd_json_span_t v, int64_t *out)
{
    const char *p = v.start;
    int neg = 0;
    uint64_t acc = 0;
    if (pd_json_type(v) != PD_JSON_NUMBER) return -1;
    if (*p == '-') {
        neg = 1;
        p++;
    }
    if (p >= v.end) return -1;
    for (; p < v.end; p++) {
        if (*p < '0' || *p > '9') return -1; /* fraction or exponent: not an integer */
        if (acc > (UINT64_MAX - 9) / 10) return -1;
        acc = acc * 10 + (uint64_t)(*p - '0');
    }
    if (acc > (uint64_t)INT64_MAX) return -1;
    *out = neg ? -(int64_t)acc : (int64_t)acc;
    return 0;
}

int pd_json_number(pd_json_span_t v, double *out)
{
    char buf[40];
    size_t n = (size_t)(v.end - v.start);
    char *endp;
    if (pd_json_type(v) != PD_JSON_NUMBER || n == 0 || n >= sizeof buf ||
        skip_number(v.start, v.end) != v.end) {
        return -1;
    }
    memcpy(buf, v.start, n);
    buf[n] = '\0';
    *out = strtod(buf, &endp);
    return endp == buf + n ? 0 : -1;
}
