#include "common/metrics_http.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

namespace spear::metrics_http {

void StopExposer(std::unique_ptr<prometheus::Exposer>& exposer, const std::string& host) {
  if (exposer == nullptr) return;
  const std::vector<int> ports = exposer->GetListeningPorts();
  in_addr addr{};
  // A numeric IPv4 host is dialled as bound; anything else (the wildcard,
  // a name, IPv6) through the loopback address.
  if (host.empty() || host == "0.0.0.0" || inet_pton(AF_INET, host.c_str(), &addr) != 1) {
    addr.s_addr = htonl(INADDR_LOOPBACK);
  }
  std::atomic<bool> done{false};
  std::thread waker;
  if (!ports.empty() && ports[0] > 0 && ports[0] < 65536) {
    sockaddr_in sa{};
    sa.sin_family = AF_INET;
    sa.sin_port = htons(static_cast<uint16_t>(ports[0]));
    sa.sin_addr = addr;
    waker = std::thread([&done, sa] {
      while (!done.load(std::memory_order_acquire)) {
        const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd >= 0) {
          // Accepted (the poll wakes; the served connection reads EOF) or
          // refused once the listening socket is closed: either is fine.
          (void)connect(fd, reinterpret_cast<const sockaddr*>(&sa), sizeof(sa));
          close(fd);
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
    });
  }
  exposer.reset();
  done.store(true, std::memory_order_release);
  if (waker.joinable()) waker.join();
}

}  // namespace spear::metrics_http
