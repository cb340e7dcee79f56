/* Redis (RESP): a command is an array of bulk strings, "*<count>\r\n". */
#ifndef COROOT_AGENT_L7_REDIS_H
#define COROOT_AGENT_L7_REDIS_H

static __always_inline int l7_redis_request(u8 *b, u32 n) {
    return n >= 4 && b[0] == '*' && b[1] >= '1' && b[1] <= '9';
}

#endif
