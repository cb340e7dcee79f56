/* RabbitMQ (AMQP 0-9-1, the specification's "General Frame Format"): a frame is its type (1
 * byte), channel (2), payload size (4, big-endian), the payload, and the frame end 0xCE. A method
 * frame (type 1) starts its payload with the class and method ids (2 bytes each). Basic (class
 * 60) Publish (method 40) carries a client's message to the broker, Basic Deliver (60) one to a
 * consumer; Consume-Ok (21) is counted too, as the first deliveries usually come in the same read.
 * One-way messages (l7_message in protocols.h): a call is one when its first frame is one of
 * these, whole in the call (its frame end where its size says). User space counts each Publish
 * and Deliver frame in the call's captured bytes (clients send several frames in one write). */
#ifndef COROOT_AGENT_L7_RABBITMQ_H
#define COROOT_AGENT_L7_RABBITMQ_H

#define L7_AMQP_FRAME_METHOD 1
#define L7_AMQP_FRAME_END 0xCE
#define L7_AMQP_BASIC 60
#define L7_AMQP_CONSUME_OK 21
#define L7_AMQP_PUBLISH 40
#define L7_AMQP_DELIVER 60

static __always_inline int l7_rabbitmq_message(u8 *b, u32 n, u64 size, u64 ptr) {
    if (n < 11 || b[0] != L7_AMQP_FRAME_METHOD || b[7] != 0 || b[8] != L7_AMQP_BASIC || b[9] != 0)
        return 0;
    if (b[10] != L7_AMQP_PUBLISH && b[10] != L7_AMQP_DELIVER && b[10] != L7_AMQP_CONSUME_OK)
        return 0;
    u64 len = ((u64)b[3] << 24) | ((u64)b[4] << 16) | ((u64)b[5] << 8) | b[6];
    if (len < 4 || 7 + len + 1 > size)
        return 0;
    u8 end = 0;
    if (bpf_probe_read_user(&end, sizeof(end), (void *)(ptr + 7 + len)) < 0)
        return 0;
    return end == L7_AMQP_FRAME_END;
}

#endif
