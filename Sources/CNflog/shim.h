#ifndef MESHTRACE_CNFLOG_SHIM_H
#define MESHTRACE_CNFLOG_SHIM_H
#include <stdint.h>
#include <sys/types.h>
#include <linux/netlink.h>
#include <linux/netfilter/nfnetlink.h>
#include <linux/netfilter/nfnetlink_log.h>
#include <libnetfilter_log/libnetfilter_log.h>
#endif
