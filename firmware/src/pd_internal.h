/* Internal hooks for the host tests: not part of the API. */
#ifndef PD_INTERNAL_H
#define PD_INTERNAL_H

#include "pd_device.h"

/* Open a session with given keys, as if a grant with this jti and exp had
 * been accepted: the test vectors' credential message is sealed under an
 * EdDSA grant's K_up, which this library cannot accept itself. */
int pd__install_session(pd_device_t *dev, const char *jti, int64_t exp, const uint8_t k[64]);

/* The same with a fixed jti and a far exp, for credential tests. */
int pd__install_session_for_test(pd_device_t *dev, const uint8_t k[64]);

#endif
