#ifndef MESHTRACE_CPCAP_SHIM_H
#define MESHTRACE_CPCAP_SHIM_H
#include <pcap/pcap.h>
#endif
