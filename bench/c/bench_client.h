/* What both bench programs share: one MQTT 5 client on 127.0.0.1 (no Nagle
 * delay, no client-side cap on QoS 1 in flight) that subscribes at QoS 1 to one
 * topic once connected. Set `program` and `subscribe_to` before connecting. */
#ifndef BENCH_CLIENT_H
#define BENCH_CLIENT_H

#include <mosquitto.h>
#include <mqtt_protocol.h>
#include <stdio.h>
#include <stdlib.h>

static const char *program;
static const char *subscribe_to;

static void on_connect(struct mosquitto *m, void *obj, int rc, int flags, const mosquitto_property *props) {
	(void)obj; (void)flags; (void)props;
	if (rc != 0) {
		fprintf(stderr, "%s: connect refused: %d\n", program, rc);
		exit(1);
	}
	mosquitto_subscribe_v5(m, NULL, subscribe_to, 1, 0, NULL);
}

/* Connected (CONNECT sent; the loop reads CONNACK and subscribes); exits 1 if not. */
static struct mosquitto *bench_connect(const char *port) {
	mosquitto_lib_init();
	struct mosquitto *m = mosquitto_new(NULL, true, NULL);
	mosquitto_int_option(m, MOSQ_OPT_PROTOCOL_VERSION, MQTT_PROTOCOL_V5);
	mosquitto_int_option(m, MOSQ_OPT_TCP_NODELAY, 1);
	mosquitto_int_option(m, MOSQ_OPT_SEND_MAXIMUM, 65535);
	mosquitto_connect_v5_callback_set(m, on_connect);
	if (mosquitto_connect_bind_v5(m, "127.0.0.1", atoi(port), 60, NULL, NULL) != MOSQ_ERR_SUCCESS) {
		fprintf(stderr, "%s: cannot connect\n", program);
		exit(1);
	}
	return m;
}

#endif
