/* The physical limit of an RPC responder on this machine: a bare MQTT 5 echo
 * on libmosquitto. It answers every QoS 1 request on TOPIC with a fixed 200
 * reply at QoS 1 to the request's Response Topic, with its Correlation Data.
 * libmosquitto acks the request itself, on receipt.
 *
 *   mqtt_echo PORT TOPIC
 */
#include "bench_client.h"

#include <mosquitto.h>
#include <mqtt_protocol.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char REPLY[] = "{\"status\":200,\"body\":{}}";

static void on_message(struct mosquitto *m, void *obj, const struct mosquitto_message *msg, const mosquitto_property *props) {
	(void)obj; (void)msg;
	char *response_topic = NULL;
	void *corr = NULL;
	uint16_t corr_len = 0;
	if (!mosquitto_property_read_string(props, MQTT_PROP_RESPONSE_TOPIC, &response_topic, false))
		return;
	mosquitto_property *out = NULL;
	if (mosquitto_property_read_binary(props, MQTT_PROP_CORRELATION_DATA, &corr, &corr_len, false))
		mosquitto_property_add_binary(&out, MQTT_PROP_CORRELATION_DATA, corr, corr_len);
	mosquitto_publish_v5(m, NULL, response_topic, (int)strlen(REPLY), REPLY, 1, false, out);
	mosquitto_property_free_all(&out);
	free(response_topic);
	free(corr);
}

int main(int argc, char **argv) {
	if (argc != 3) {
		fprintf(stderr, "usage: mqtt_echo PORT TOPIC\n");
		return 2;
	}
	program = "mqtt_echo";
	subscribe_to = argv[2];
	struct mosquitto *m = bench_connect(argv[1]);
	mosquitto_message_v5_callback_set(m, on_message);
	int rc = mosquitto_loop_forever(m, -1, 1);
	mosquitto_destroy(m);
	mosquitto_lib_cleanup();
	return rc == MOSQ_ERR_SUCCESS ? 0 : 1;
}
