#include "pd_device.h"

#include <stdio.h>
#include <string.h>

#include "pd_codec.h"
#include "pd_crypto.h"
#include "pd_internal.h"

static const char SESSION_INFO[] = "provisiond wifi-session v1";
static const char CREDENTIAL_AAD[] = "provisiond wifi-credential v1";
static const char STATUS_AAD[] = "provisiond wifi-status v1";
static const char AUDIENCE[] = "wifi-config";

static const char *const REASONS[] = {
    "ok",          "malformed",     "alg_not_allowed", "unknown_kid",    "bad_signature",
    "wrong_audience", "wrong_subject", "missing_cap",  "expired",        "not_yet_valid",
    "replayed",    "stale_iat",     "wrong_nonce",     "busy",           "storage_failed",
    "no_grant",    "already_used",  "decrypt_failed",  "bad_credentials", "bad_argument",
    "crypto_error",
};

const char *pd_reason_str(int result)
{
    if (result < 0 || (size_t)result >= sizeof REASONS / sizeof REASONS[0]) {
        return "unknown";
    }
    return REASONS[result];
}

const char *pd_state_str(pd_state_t state)
{
    switch (state) {
    case PD_STATE_IDLE: return "idle";
    case PD_STATE_GRANT_ACCEPTED: return "grant-accepted";
    case PD_STATE_CONNECTING: return "connecting";
    case PD_STATE_CONNECTED: return "connected";
    case PD_STATE_FAILED: return "failed";
    }
    return "idle";
}

/* ------------------------------------------------------------------ keys */

int pd_key_from_jwk(pd_key_t *key, const char *json, size_t len)
{
    pd_json_span_t doc, v;
    char kty[8], buf[128];
    size_t n, blen;
    memset(key, 0, sizeof *key);
    if (pd_json_parse(json, len, &doc) != 0 || pd_json_type(doc) != PD_JSON_OBJECT ||
        pd_json_get(doc, "kty", &v) != 1 || pd_json_string(v, kty, sizeof kty, NULL) != 0 ||
        pd_json_get(doc, "kid", &v) != 1 || pd_json_string(v, key->kid, sizeof key->kid, &n) != 0 ||
        n == 0) {
        return PD_MALFORMED;
    }
    /* The key type fixes the one algorithm we will ever accept; a JWK whose
     * alg or use disagrees is refused now rather than sorted out per token. */
    if (pd_json_get(doc, "use", &v) == 1 &&
        (pd_json_string(v, buf, sizeof buf, NULL) != 0 || strcmp(buf, "sig") != 0)) {
        return PD_MALFORMED;
    }
    if (strcmp(kty, "EC") == 0) {
        uint8_t x[32], y[32];
        size_t xl, yl;
        if (pd_json_get(doc, "alg", &v) == 1 &&
            (pd_json_string(v, buf, sizeof buf, NULL) != 0 || strcmp(buf, "ES256") != 0)) {
            return PD_ALG_NOT_ALLOWED;
        }
        if (pd_json_get(doc, "crv", &v) != 1 || pd_json_string(v, buf, sizeof buf, NULL) != 0 ||
            strcmp(buf, "P-256") != 0) {
            return PD_ALG_NOT_ALLOWED;
        }
        if (pd_json_get(doc, "x", &v) != 1 || pd_json_string(v, buf, sizeof buf, &blen) != 0 ||
            pd_b64url_decode(buf, blen, x, sizeof x, &xl) != 0 || xl != 32 ||
            pd_json_get(doc, "y", &v) != 1 || pd_json_string(v, buf, sizeof buf, &blen) != 0 ||
            pd_b64url_decode(buf, blen, y, sizeof y, &yl) != 0 || yl != 32) {
            return PD_MALFORMED;
        }
        key->p256[0] = 0x04;
        memcpy(key->p256 + 1, x, 32);
        memcpy(key->p256 + 33, y, 32);
        if (pd_p256_check(key->p256) != 0) {
            return PD_MALFORMED;
        }
        key->alg = PD_ALG_ES256;
        return PD_OK;
    }
    if (strcmp(kty, "oct") == 0) {
        if (pd_json_get(doc, "alg", &v) == 1 &&
            (pd_json_string(v, buf, sizeof buf, NULL) != 0 || strcmp(buf, "HS256") != 0)) {
            return PD_ALG_NOT_ALLOWED;
        }
        if (pd_json_get(doc, "k", &v) != 1 || pd_json_string(v, buf, sizeof buf, &blen) != 0 ||
            pd_b64url_decode(buf, blen, key->hs256, sizeof key->hs256, &key->hs256_len) != 0 ||
            key->hs256_len < 32) {
            pd_wipe(buf, sizeof buf);
            memset(key, 0, sizeof *key);
            return PD_MALFORMED;
        }
        pd_wipe(buf, sizeof buf);
        key->alg = PD_ALG_HS256;
        return PD_OK;
    }
    /* OKP/Ed25519 included: mbedTLS 2.x cannot verify EdDSA. */
    return PD_ALG_NOT_ALLOWED;
}

/* ------------------------------------------------------------------ device */

static int rng_adapter(void *ctx, unsigned char *buf, size_t len)
{
    const pd_config_t *cfg = (const pd_config_t *)ctx;
    return cfg->random(cfg->ctx, buf, len);
}

static int renew_nonce(pd_device_t *dev)
{
    /* A new nonce invalidates every grant minted for the old one. */
    return dev->cfg.random(dev->cfg.ctx, dev->nonce, sizeof dev->nonce) == 0 ? PD_OK
                                                                            : PD_CRYPTO_ERROR;
}

int pd_device_init(pd_device_t *dev, const pd_config_t *cfg, const pd_key_t *pinned,
                   const pd_freshness_t *restored)
{
    if (!dev || !cfg || !pinned || !cfg->random || (cfg->has_clock && !cfg->now) ||
        pinned->alg == PD_ALG_NONE) {
        return PD_BAD_ARGUMENT;
    }
    memset(dev, 0, sizeof *dev);
    dev->cfg = *cfg;
    dev->key = *pinned;
    dev->state = PD_STATE_IDLE;
    if (restored) {
        if (restored->count > PD_LEDGER_SIZE) {
            return PD_BAD_ARGUMENT;
        }
        dev->fresh = *restored;
    }
    if (pd_x25519_base(cfg->private_key, dev->public_key, rng_adapter, &dev->cfg) != 0) {
        return PD_CRYPTO_ERROR;
    }
    return renew_nonce(dev);
}

void pd_device_deinit(pd_device_t *dev)
{
    pd_wipe(dev, sizeof *dev);
}

void pd_device_set_nonce(pd_device_t *dev, const uint8_t nonce[PD_NONCE_LEN])
{
    memcpy(dev->nonce, nonce, PD_NONCE_LEN);
}

size_t pd_device_info(const pd_device_t *dev, char *out, size_t cap)
{
    char pub[48], nonce[32];
    int n;
    pd_b64url_encode(dev->public_key, sizeof dev->public_key, pub, sizeof pub);
    pd_b64url_encode(dev->nonce, sizeof dev->nonce, nonce, sizeof nonce);
    n = snprintf(out, cap, "{\"capabilities\":%lu,\"device_id\":%lu,\"nonce\":\"%s\",\"public_key\":\"%s\"}",
                 (unsigned long)dev->cfg.capabilities, (unsigned long)dev->cfg.device_id, nonce,
                 pub);
    return (n < 0 || (size_t)n >= cap) ? 0 : (size_t)n;
}

/* ------------------------------------------------------------------ grant */

typedef struct {
    int64_t iat, exp, cap;
    uint8_t epk[32];
    uint8_t jti[PD_JTI_LEN];
    char jti_text[24];
    uint8_t dn[96];
    size_t dn_len;
    int has_dn;
} claims_t;

static int b64_claim(pd_json_span_t obj, const char *name, uint8_t *out, size_t cap, size_t *len,
                     char *text, size_t text_cap)
{
    pd_json_span_t v;
    char buf[128];
    size_t n;
    if (pd_json_get(obj, name, &v) != 1 || pd_json_string(v, buf, sizeof buf, &n) != 0 ||
        pd_b64url_decode(buf, n, out, cap, len) != 0) {
        return -1;
    }
    if (text) {
        if (n + 1 > text_cap) return -1;
        memcpy(text, buf, n + 1);
    }
    return 0;
}

/* In the reference device's order, so both give the same reason for the
 * same token (wifi-crypto.md §2.1 step 5). */
static int parse_claims(pd_json_span_t c, const pd_device_t *dev, claims_t *out)
{
    pd_json_span_t v;
    char buf[64];
    size_t n, epk_len = 0, jti_len = 0;
    int r;

    if (pd_json_get(c, "cap", &v) != 1 || pd_json_int(v, &out->cap) != 0) {
        return PD_MISSING_CAP;
    }
    /* v1 grants carry one audience string; an array is not ours. */
    if (pd_json_get(c, "aud", &v) != 1 || pd_json_type(v) != PD_JSON_STRING) {
        return PD_WRONG_AUDIENCE;
    }
    if (b64_claim(c, "epk", out->epk, sizeof out->epk, &epk_len, NULL, 0) != 0 ||
        b64_claim(c, "jti", out->jti, sizeof out->jti, &jti_len, out->jti_text,
                  sizeof out->jti_text) != 0) {
        return PD_MALFORMED;
    }
    r = pd_json_get(c, "dn", &v);
    if (r < 0) return PD_MALFORMED;
    out->has_dn = r == 1 && pd_json_type(v) != PD_JSON_NULL;
    if (out->has_dn && b64_claim(c, "dn", out->dn, sizeof out->dn, &out->dn_len, NULL, 0) != 0) {
        return PD_MALFORMED;
    }
    if (epk_len != 32 || jti_len != PD_JTI_LEN) return PD_MALFORMED;
    if (pd_json_get(c, "iss", &v) != 1 || pd_json_type(v) != PD_JSON_STRING) return PD_MALFORMED;
    if (pd_json_get(c, "sub", &v) != 1 || pd_json_type(v) != PD_JSON_STRING) return PD_MALFORMED;
    if (pd_json_get(c, "iat", &v) != 1 || pd_json_int(v, &out->iat) != 0) return PD_MALFORMED;
    if (pd_json_get(c, "exp", &v) != 1 || pd_json_int(v, &out->exp) != 0) return PD_MALFORMED;

    pd_json_get(c, "aud", &v);
    if (pd_json_string(v, buf, sizeof buf, &n) != 0 || n != sizeof AUDIENCE - 1 ||
        memcmp(buf, AUDIENCE, n) != 0) {
        return PD_WRONG_AUDIENCE;
    }
    {
        char want[16];
        int wl = snprintf(want, sizeof want, "%lu", (unsigned long)dev->cfg.device_id);
        pd_json_get(c, "sub", &v);
        if (pd_json_string(v, buf, sizeof buf, &n) != 0 || n != (size_t)wl ||
            memcmp(buf, want, n) != 0) {
            return PD_WRONG_SUBJECT;
        }
    }
    if (!(out->cap & PD_CAP_WIFI_UPLOAD)) return PD_MISSING_CAP;
    /* exp - iat computed without overflow for any int64 pair. */
    if (out->exp <= out->iat || (out->iat > 0 && out->exp - out->iat > PD_MAX_GRANT_LIFETIME) ||
        (out->iat <= 0 && out->exp > out->iat + PD_MAX_GRANT_LIFETIME)) {
        return PD_MALFORMED;
    }
    return PD_OK;
}

static int decode_segment(const char *s, size_t n, uint8_t *out, size_t cap, size_t *len,
                          pd_json_span_t *obj)
{
    if (pd_b64url_decode(s, n, out, cap, len) != 0) return -1;
    if (!obj) return 0;
    if (!pd_utf8_valid(out, *len) || pd_json_parse((const char *)out, *len, obj) != 0 ||
        pd_json_type(*obj) != PD_JSON_OBJECT || !pd_json_keys_unique(*obj)) {
        return -1;
    }
    return 0;
}

static int verify_signature(const pd_key_t *key, const char *input, size_t n, const uint8_t *sig,
                            size_t sig_len)
{
    if (key->alg == PD_ALG_ES256) {
        /* JWS carries ECDSA as fixed-size r || s, not DER (RFC 7518 §3.4). */
        return sig_len == 64 && pd_es256_verify(key->p256, (const uint8_t *)input, n, sig) == 0;
    }
    if (key->alg == PD_ALG_HS256) {
        uint8_t mac[32];
        int ok = pd_hmac_sha256(key->hs256, key->hs256_len, (const uint8_t *)input, n, mac) == 0 &&
                 sig_len == 32 && pd_ct_equal(mac, sig, 32);
        pd_wipe(mac, sizeof mac);
        return ok;
    }
    return 0;
}

static void prune_ledger(pd_device_t *dev)
{
    /* Without a clock "expired" means not after the newest accepted iat:
     * such a jti is refused by the iat rule anyway. */
    int64_t horizon = dev->cfg.has_clock ? dev->cfg.now(dev->cfg.ctx)
                                         : (dev->fresh.has_last_iat ? dev->fresh.last_iat : 0);
    size_t keep = 0;
    for (size_t i = 0; i < dev->fresh.count; i++) {
        if (dev->fresh.ledger[i].exp > horizon) {
            dev->fresh.ledger[keep++] = dev->fresh.ledger[i];
        }
    }
    memset(&dev->fresh.ledger[keep], 0, (dev->fresh.count - keep) * sizeof dev->fresh.ledger[0]);
    dev->fresh.count = (uint8_t)keep;
}

static void wipe_session(pd_device_t *dev)
{
    pd_wipe(&dev->session, sizeof dev->session);
}

int pd_session_keys(const uint8_t z[PD_KEY_LEN], const char *blob, size_t len, uint8_t k[64])
{
    uint8_t salt[32];
    /* The blob salts HKDF so these keys belong to this grant alone. */
    if (pd_sha256((const uint8_t *)blob, len, salt) != 0) return PD_CRYPTO_ERROR;
    return pd_hkdf_sha256(salt, sizeof salt, z, PD_KEY_LEN, SESSION_INFO, k, 64) == 0
               ? PD_OK
               : PD_CRYPTO_ERROR;
}

int pd_accept_grant(pd_device_t *dev, const char *blob, size_t len, pd_grant_info_t *info)
{
    /* The three segments decode into the device's scratch buffer, one after
     * the other (3/4 of the blob at most), so a grant costs no large stack
     * frame and an oversized signature is refused as bad_signature, as by
     * the reference, rather than as malformed. */
    uint8_t *header = dev->scratch, *payload = NULL, *sig = NULL;
    size_t hlen, plen, slen, i, dot1 = 0, dot2 = 0, dots = 0;
    pd_json_span_t h, c, v;
    claims_t cl;
    char alg[16], kid[PD_MAX_KID_LEN + 1];
    uint8_t z[32], k[64];
    int r;
    int64_t now = 0;

    if (dev->state == PD_STATE_CONNECTING) {
        return PD_BUSY;
    }
    if (!blob || len == 0 || len > PD_MAX_GRANT_LEN) {
        return PD_MALFORMED;
    }
    for (i = 0; i < len; i++) {
        if ((unsigned char)blob[i] > 0x7F) return PD_MALFORMED;
        if (blob[i] == '.') {
            if (dots == 0) dot1 = i;
            if (dots == 1) dot2 = i;
            dots++;
        }
    }
    if (dots != 2 ||
        decode_segment(blob, dot1, header, sizeof dev->scratch, &hlen, &h) != 0 ||
        (payload = header + hlen,
         decode_segment(blob + dot1 + 1, dot2 - dot1 - 1, payload, sizeof dev->scratch - hlen,
                        &plen, &c) != 0) ||
        (sig = payload + plen,
         decode_segment(blob + dot2 + 1, len - dot2 - 1, sig, sizeof dev->scratch - hlen - plen,
                        &slen, NULL) != 0)) {
        return PD_MALFORMED;
    }

    /* Algorithm and key come from what we pinned, never from the token. */
    if (pd_json_get(h, "alg", &v) != 1 || pd_json_string(v, alg, sizeof alg, NULL) != 0 ||
        strcmp(alg, dev->key.alg == PD_ALG_ES256 ? "ES256" : "HS256") != 0) {
        return PD_ALG_NOT_ALLOWED;
    }
    if (pd_json_get(h, "kid", &v) != 1 || pd_json_string(v, kid, sizeof kid, NULL) != 0 ||
        strcmp(kid, dev->key.kid) != 0) {
        return PD_UNKNOWN_KID;
    }
    /* RFC 7515 §4.1.11: extensions we do not implement must be refused. */
    if (pd_json_get(h, "crit", &v) != 0) {
        return PD_MALFORMED;
    }
    /* Over the segments exactly as received, never a re-encoding. */
    if (!verify_signature(&dev->key, blob, dot2, sig, slen)) {
        return PD_BAD_SIGNATURE;
    }

    memset(&cl, 0, sizeof cl);
    r = parse_claims(c, dev, &cl);
    if (r != PD_OK) return r;

    if (dev->cfg.has_clock) {
        int64_t nbf = 0;
        now = dev->cfg.now(dev->cfg.ctx);
        if (now - dev->cfg.leeway >= cl.exp) return PD_EXPIRED;
        r = pd_json_get(c, "nbf", &v);
        if (r < 0 || (r == 1 && pd_json_int(v, &nbf) != 0)) return PD_MALFORMED;
        if (nbf > now + dev->cfg.leeway) return PD_NOT_YET_VALID;
        if (cl.iat > now + dev->cfg.leeway) return PD_NOT_YET_VALID;
    }

    /* Single use: the ledger names a replay precisely; monotonic iat is what
     * actually holds on a clockless device. */
    prune_ledger(dev);
    for (i = 0; i < dev->fresh.count; i++) {
        if (pd_ct_equal(dev->fresh.ledger[i].jti, cl.jti, PD_JTI_LEN)) return PD_REPLAYED;
    }
    if (dev->fresh.has_last_iat && cl.iat <= dev->fresh.last_iat) return PD_STALE_IAT;
    if (cl.has_dn) {
        if (cl.dn_len != PD_NONCE_LEN || !pd_ct_equal(cl.dn, dev->nonce, PD_NONCE_LEN)) {
            return PD_WRONG_NONCE;
        }
    } else if (dev->cfg.require_nonce) {
        return PD_WRONG_NONCE;
    }

    r = pd_x25519(dev->cfg.private_key, cl.epk, z, rng_adapter, &dev->cfg);
    if (r == PD_X25519_LOW_ORDER) return PD_MALFORMED;
    if (r != 0) return PD_CRYPTO_ERROR;
    r = pd_session_keys(z, blob, len, k);
    pd_wipe(z, sizeof z);
    if (r != PD_OK) {
        pd_wipe(k, sizeof k);
        return r;
    }

    /* Commit, and make it durable first, so a refused or unpersisted grant
     * leaves no trace. */
    {
        /* Undo information instead of a copy of the whole ledger: this
         * function's frame is what a device's task stack must hold. */
        pd_ledger_entry_t entry, evicted;
        int64_t old_last_iat = dev->fresh.last_iat;
        uint8_t old_has_last_iat = dev->fresh.has_last_iat;
        int appended = 0;
        size_t min = PD_LEDGER_SIZE;
        entry.exp = cl.exp;
        memcpy(entry.jti, cl.jti, PD_JTI_LEN);
        if (dev->fresh.count < PD_LEDGER_SIZE) {
            dev->fresh.ledger[dev->fresh.count++] = entry;
            appended = 1;
        } else {
            /* Evict the earliest exp (the oldest on a tie), as the reference
             * does; even the new entry, if it is the earliest: an evicted
             * jti's iat is <= last_iat, so the iat rule still refuses it. */
            min = 0;
            for (i = 1; i < PD_LEDGER_SIZE; i++) {
                if (dev->fresh.ledger[i].exp < dev->fresh.ledger[min].exp) min = i;
            }
            if (entry.exp >= dev->fresh.ledger[min].exp) {
                evicted = dev->fresh.ledger[min];
                memmove(&dev->fresh.ledger[min], &dev->fresh.ledger[min + 1],
                        (PD_LEDGER_SIZE - 1 - min) * sizeof entry);
                dev->fresh.ledger[PD_LEDGER_SIZE - 1] = entry;
            } else {
                min = PD_LEDGER_SIZE;
            }
        }
        dev->fresh.last_iat = cl.iat;
        dev->fresh.has_last_iat = 1;
        if (dev->cfg.persist && dev->cfg.persist(dev->cfg.ctx, &dev->fresh) != 0) {
            if (appended) {
                dev->fresh.count--;
                memset(&dev->fresh.ledger[dev->fresh.count], 0, sizeof entry);
            } else if (min < PD_LEDGER_SIZE) {
                memmove(&dev->fresh.ledger[min + 1], &dev->fresh.ledger[min],
                        (PD_LEDGER_SIZE - 1 - min) * sizeof entry);
                dev->fresh.ledger[min] = evicted;
            }
            dev->fresh.last_iat = old_last_iat;
            dev->fresh.has_last_iat = old_has_last_iat;
            pd_wipe(k, sizeof k);
            return PD_STORAGE_FAILED;
        }
    }
    /* A pending session whose credentials never came is simply superseded. */
    wipe_session(dev);
    dev->session.active = 1;
    memcpy(dev->session.jti, cl.jti_text, sizeof dev->session.jti);
    memcpy(dev->session.jti_raw, cl.jti, PD_JTI_LEN);
    dev->session.exp = cl.exp;
    memcpy(dev->session.k_up, k, 32);
    memcpy(dev->session.k_down, k + 32, 32);
    pd_wipe(k, sizeof k);
    dev->state = PD_STATE_GRANT_ACCEPTED;
    if (info) {
        memcpy(info->jti, cl.jti_text, sizeof info->jti);
        info->iat = cl.iat;
        info->exp = cl.exp;
    }
    return renew_nonce(dev);
}

/* ------------------------------------------------------------------ credentials */

static int printable_ascii(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (s[i] < 0x20 || s[i] > 0x7E) return 0;
    }
    return 1;
}

static int hex64(const char *s, size_t n)
{
    if (n != 64) return 0;
    for (size_t i = 0; i < n; i++) {
        char ch = s[i];
        if (!((ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'f') || (ch >= 'A' && ch <= 'F'))) {
            return 0;
        }
    }
    return 1;
}

static size_t utf8_chars(const char *s, size_t n)
{
    size_t count = 0;
    for (size_t i = 0; i < n; i++) {
        if (((unsigned char)s[i] & 0xC0) != 0x80) count++;
    }
    return count;
}

static int parse_credentials(const char *text, size_t n, pd_wifi_credentials_t *out)
{
    pd_json_span_t doc, v;
    size_t members = 0, sl = 0, pl = 0;
    const char *p = NULL;
    pd_json_span_t k;
    int r;
    if (!pd_utf8_valid((const uint8_t *)text, n) || pd_json_parse(text, n, &doc) != 0 ||
        pd_json_type(doc) != PD_JSON_OBJECT || !pd_json_keys_unique(doc)) {
        return -1;
    }
    while ((r = pd_json_next_member(doc, &p, &k, &v)) == 1) members++;
    if (r < 0 || members != 3) return -1;
    if (pd_json_get(doc, "ssid", &v) != 1 ||
        pd_json_string(v, out->ssid, sizeof out->ssid, &sl) != 0 || sl < 1) {
        return -1;
    }
    out->ssid_len = sl;
    if (pd_json_get(doc, "security", &v) != 1 ||
        pd_json_string(v, out->security, sizeof out->security, NULL) != 0) {
        return -1;
    }
    /* Longer than 128 bytes is refused by the buffer itself. */
    if (pd_json_get(doc, "password", &v) != 1 ||
        pd_json_string(v, out->password, sizeof out->password, &pl) != 0) {
        return -1;
    }
    if (strcmp(out->security, "open") == 0) {
        return pl == 0 ? 0 : -1;
    }
    if (strcmp(out->security, "wpa3-sae") == 0) {
        /* SAE has no PSK length rule; the bound only keeps messages small. */
        return pl >= 1 ? 0 : -1;
    }
    if (strcmp(out->security, "wpa2-psk") == 0 || strcmp(out->security, "wpa2-wpa3") == 0) {
        /* IEEE 802.11i: a passphrase is 8..63 printable ASCII, or the PSK as 64 hex. */
        size_t chars = utf8_chars(out->password, pl);
        if ((chars >= 8 && chars <= 63 && pl == chars && printable_ascii(out->password, pl)) ||
            hex64(out->password, pl)) {
            return 0;
        }
    }
    return -1;
}

static int fail_credentials(pd_device_t *dev, int reason)
{
    /* Stay in the session so pd_finish can still seal the reason. */
    dev->session.failure = reason;
    dev->state = PD_STATE_FAILED;
    return reason;
}

int pd_receive_credentials(pd_device_t *dev, const uint8_t *msg, size_t len,
                           pd_wifi_credentials_t *out)
{
    size_t n;
    int ok;
    if (!dev->session.active) return PD_NO_GRANT;
    if (dev->session.credentials_used) return PD_ALREADY_USED;
    /* Spent before decrypting: a grant buys one attempt, good or bad. */
    dev->session.credentials_used = 1;
    if (dev->cfg.has_clock && dev->cfg.now(dev->cfg.ctx) - dev->cfg.leeway >= dev->session.exp) {
        return fail_credentials(dev, PD_EXPIRED);
    }
    if (!msg || len <= 12 + 16 || len > PD_MAX_CREDENTIAL_LEN) {
        return fail_credentials(dev, PD_DECRYPT_FAILED);
    }
    n = len - 12 - 16;
    if (pd_gcm_open(dev->session.k_up, msg, CREDENTIAL_AAD, msg + 12, len - 12, dev->scratch) != 0) {
        return fail_credentials(dev, PD_DECRYPT_FAILED);
    }
    memset(out, 0, sizeof *out);
    ok = parse_credentials((const char *)dev->scratch, n, out) == 0;
    pd_wipe(dev->scratch, n);
    if (!ok) {
        pd_wipe(out, sizeof *out);
        return fail_credentials(dev, PD_BAD_CREDENTIALS);
    }
    dev->state = PD_STATE_CONNECTING;
    return PD_OK;
}

/* ------------------------------------------------------------------ status */

static int reason_valid(const char *reason)
{
    size_t n = strlen(reason);
    if (n < 1 || n > PD_MAX_REASON_LEN) return 0;
    for (size_t i = 0; i < n; i++) {
        char ch = reason[i];
        if (!((ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') || ch == '_' || ch == '-')) {
            return 0;
        }
    }
    return 1;
}

int pd_status(pd_device_t *dev, pd_state_t state, const char *reason, uint8_t *out, size_t cap,
              size_t *out_len)
{
    char text[PD_MAX_STATUS_LEN - 16];
    uint8_t nonce[12] = {0};
    int n;
    uint64_t counter;
    if (!dev->session.active) return PD_NO_GRANT;
    if (reason && !reason_valid(reason)) return PD_BAD_ARGUMENT;
    /* Sorted keys, compact: the uploader's bytes and ours must agree. */
    if (reason) {
        n = snprintf(text, sizeof text, "{\"grant_id\":\"%s\",\"reason\":\"%s\",\"state\":\"%s\"}",
                     dev->session.jti, reason, pd_state_str(state));
    } else {
        n = snprintf(text, sizeof text, "{\"grant_id\":\"%s\",\"state\":\"%s\"}", dev->session.jti,
                     pd_state_str(state));
    }
    if (n < 0 || (size_t)n >= sizeof text || (size_t)n + 16 > cap) return PD_BAD_ARGUMENT;
    counter = dev->session.counter;
    for (int i = 0; i < 8; i++) {
        nonce[11 - i] = (uint8_t)(counter >> (8 * i));
    }
    if (pd_gcm_seal(dev->session.k_down, nonce, STATUS_AAD, (const uint8_t *)text, (size_t)n, out) != 0) {
        return PD_CRYPTO_ERROR;
    }
    /* The counter is the nonce: it must move on after every message. */
    dev->session.counter++;
    *out_len = (size_t)n + 16;
    return PD_OK;
}

int pd_status_message(pd_device_t *dev, const char *reason, uint8_t *out, size_t cap,
                      size_t *out_len)
{
    return pd_status(dev, dev->state, reason, out, cap, out_len);
}

int pd_finish(pd_device_t *dev, int connected, const char *reason, uint8_t *out, size_t cap,
              size_t *out_len)
{
    int r;
    if (!dev->session.active) return PD_NO_GRANT;
    if (!connected && reason == NULL) {
        /* No credentials ever came (uploader gone, timeout): say so. */
        reason = dev->session.failure != PD_OK ? pd_reason_str(dev->session.failure)
                 : dev->session.credentials_used ? "unknown"
                                                 : "no_credentials";
    }
    r = pd_status(dev, connected ? PD_STATE_CONNECTED : PD_STATE_FAILED, connected ? NULL : reason,
                  out, cap, out_len);
    if (r != PD_OK) return r;
    memset(&dev->last_report, 0, sizeof dev->last_report);
    dev->last_report.valid = 1;
    dev->last_report.connected = connected;
    memcpy(dev->last_report.grant_id, dev->session.jti, sizeof dev->last_report.grant_id);
    if (!connected) {
        snprintf(dev->last_report.reason, sizeof dev->last_report.reason, "%s", reason);
    }
    wipe_session(dev);
    dev->state = PD_STATE_IDLE;
    return renew_nonce(dev);
}

int pd__install_session(pd_device_t *dev, const char *jti, int64_t exp, const uint8_t k[64])
{
    size_t n = strlen(jti), raw_len;
    if (n >= sizeof dev->session.jti ||
        pd_b64url_decode(jti, n, dev->session.jti_raw, PD_JTI_LEN, &raw_len) != 0) {
        return PD_BAD_ARGUMENT;
    }
    wipe_session(dev);
    dev->session.active = 1;
    memcpy(dev->session.jti, jti, n + 1);
    pd_b64url_decode(jti, n, dev->session.jti_raw, PD_JTI_LEN, &raw_len);
    dev->session.exp = exp;
    memcpy(dev->session.k_up, k, 32);
    memcpy(dev->session.k_down, k + 32, 32);
    dev->state = PD_STATE_GRANT_ACCEPTED;
    return PD_OK;
}

int pd__install_session_for_test(pd_device_t *dev, const uint8_t k[64])
{
    return pd__install_session(dev, "AAECAwQFBgcICQoLDA0ODw", INT64_MAX / 2, k);
}

size_t pd_device_sizeof(void)
{
    return sizeof(pd_device_t);
}

size_t pd_config_sizeof(void)
{
    return sizeof(pd_config_t);
}

size_t pd_freshness_sizeof(void)
{
    return sizeof(pd_freshness_t);
}

pd_state_t pd_device_state(const pd_device_t *dev)
{
    return dev->state;
}

const uint8_t *pd_device_nonce(const pd_device_t *dev)
{
    return dev->nonce;
}

const uint8_t *pd_device_public_key(const pd_device_t *dev)
{
    return dev->public_key;
}

const pd_report_t *pd_device_last_report(const pd_device_t *dev)
{
    return &dev->last_report;
}

const pd_freshness_t *pd_device_freshness(const pd_device_t *dev)
{
    return &dev->fresh;
}

int pd_public_key(const uint8_t private_key[PD_KEY_LEN], uint8_t public_key[PD_KEY_LEN],
                  int (*random)(void *ctx, uint8_t *buf, size_t len), void *ctx)
{
    pd_config_t cfg;
    int r;
    memset(&cfg, 0, sizeof cfg);
    cfg.random = random;
    cfg.ctx = ctx;
    r = pd_x25519_base(private_key, public_key, rng_adapter, &cfg) == 0 ? PD_OK : PD_CRYPTO_ERROR;
    return r;
}
