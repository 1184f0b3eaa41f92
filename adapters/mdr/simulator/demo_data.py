"""Realistic demo data in Russian and English, and the function that seeds it into a simulator."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mdr_connector.adapters.mdr.simulator.protocol import HOUR

if TYPE_CHECKING:
    from mdr_connector.adapters.mdr.simulator.state import MdrSimulator


DEMO_TENANTS = ("", "Филиал Казань", "Retail EU")
DEMO_HOSTS = ("WS-FIN-017", "WS-HR-004", "SRV-DC-01", "SRV-SQL-02", "LT-DEV-112", "WS-ACC-033", "SRV-WEB-05")
DEMO_ANALYSTS = ("Анна Кузнецова (MDR SOC L2)", "Kaspersky MDR SOC", "Dmitry Volkov (MDR SOC L3)")

DEMO_INCIDENTS = (
    {
        "summary": "Подозрительный запуск PowerShell из макроса Office на {host}",
        "description": (
            "Пользователь открыл вложение `Счёт_0425.docm`, после чего макрос запустил "
            "`powershell.exe -enc ...`.\n\n**Рекомендации:**\n\n1. Изолируйте хост.\n"
            "2. Сбросьте пароль учётной записи пользователя.\n"
        ),
        "priority": "HIGH",
        "detection_technology": "EDR",
        "attack_stage": "Execution",
        "mitre_tactics": ["Execution", "Initial access"],
        "mitre_techniques": ["T1059.001: PowerShell", "T1566.001: Spearphishing Attachment"],
    },
    {
        "summary": "Credential dumping attempt (LSASS access) on {host}",
        "description": (
            "A process opened `lsass.exe` with `PROCESS_VM_READ` rights. The binary is an "
            "unsigned copy of *procdump* renamed to `svch0st.exe`.\n\n| Field | Value |\n|---|---|\n"
            "| SHA256 | `3f1c...9ab2` |\n| User | CORP\\svc_backup |\n"
        ),
        "priority": "HIGH",
        "detection_technology": "KATA",
        "attack_stage": "Credential access",
        "mitre_tactics": ["Credential access"],
        "mitre_techniques": ["T1003.001: LSASS Memory"],
    },
    {
        "summary": "Сканирование сети с рабочей станции {host}",
        "description": "Хост выполнил SMB-сканирование подсети 10.20.0.0/24 (более 200 адресов за 5 минут).",
        "priority": "NORMAL",
        "detection_technology": "NDR",
        "attack_stage": "Discovery",
        "mitre_tactics": ["Discovery"],
        "mitre_techniques": ["T1046: Network Service Discovery"],
    },
    {
        "summary": "Outbound connection to a known C2 domain from {host}",
        "description": (
            "DNS queries to `update-check.cdn-stat.example` match an indicator of a "
            "commodity RAT. The connection was blocked by the web threat protection."
        ),
        "priority": "NORMAL",
        "detection_technology": "EPP",
        "attack_stage": "Command and control",
        "mitre_tactics": ["Command and control"],
        "mitre_techniques": ["T1071.004: DNS"],
    },
    {
        "summary": "Установка нежелательного ПО для удалённого доступа на {host}",
        "description": (
            "Обнаружена установка AnyDesk пользователем без прав администратора. "
            "Вероятно, легитимная активность."
        ),
        "priority": "LOW",
        "detection_technology": "EPP",
        "attack_stage": "Persistence",
        "mitre_tactics": ["Persistence"],
        "mitre_techniques": ["T1219: Remote Access Software"],
    },
    {
        "summary": "Scheduled task created for persistence on {host}",
        "description": (
            "A scheduled task `\\Microsoft\\Windows\\UpdateOrchestrator\\Sync` runs a script "
            "from `%TEMP%` every 15 minutes."
        ),
        "priority": "NORMAL",
        "detection_technology": "EDR",
        "attack_stage": "Persistence",
        "mitre_tactics": ["Persistence", "Execution"],
        "mitre_techniques": ["T1053.005: Scheduled Task"],
    },
)

DEMO_COMMENTS = (
    "<p>Мы проанализировали дамп процесса. Полезная нагрузка — загрузчик <b>Cobalt Strike</b>.</p>",
    "<p>Please confirm whether the activity of <code>svc_backup</code> was planned by your IT team.</p>",
    "<p>Хост изолирован от сети. Ожидаем подтверждения на удаление файла.</p>",
    "<p>No further activity observed in the last 24 hours. We lower the priority.</p>",
)


def seed_demo_incidents(sim: MdrSimulator, client_id: str, count: int) -> list[dict[str, Any]]:
    rng = sim._random
    now = sim.now_ms()
    seeded = []
    for index in range(count):
        template = DEMO_INCIDENTS[index % len(DEMO_INCIDENTS)]
        host = rng.choice(DEMO_HOSTS)
        tenant = DEMO_TENANTS[index % len(DEMO_TENANTS)]
        asset = sim.add_asset(client_id, host, tenant_name=tenant)
        created = now - rng.randint(1, 72) * HOUR * 1000
        fields = {
            **template,
            "summary": template["summary"].format(host=host),
            "affected_hosts": [f"{host}:{asset['asset_id']}"],
            "affected_hosts_mappings": [{"host_id": asset["asset_id"], "host_name": host}],
            "status": "Open" if index % 4 else "On hold",
            "tenant_name": tenant,
            "creation_time": created,
            "update_time": created,
        }
        incident = sim.seed_incident(client_id, **fields)
        if index % 2 == 0:
            sim.add_soc_comment(
                client_id,
                incident["incident_id"],
                DEMO_COMMENTS[index % len(DEMO_COMMENTS)],
                author=rng.choice(DEMO_ANALYSTS),
            )
        if template["priority"] == "HIGH":
            sim.add_response(
                client_id,
                incident["incident_id"],
                type="NETWORK_ISOLATION",
                description="Isolate the host from the network for 24 hours.",
                parameters={"period": 86400},
            )
        seeded.append(sim.incident(client_id, incident["incident_id"]))
    return seeded
