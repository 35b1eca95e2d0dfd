// A sample to break and watch heal, and to release a new version with no lost request: two
// scale sets of Ubuntu VMs (blue serving, green at zero) behind one Standard load balancer that
// probes each VM's app (/healthz on port 8080), each VM running the Linux heartbeat agent against
// the healer's topic — and the healer itself (main.bicep), watching both, in one deployment.
//
//   az deployment group create -g <rg> -f infra/sample/sample.bicep -p sshPublicKey="$(cat ~/.ssh/id_ed25519.pub)"
//
// See README.md next to this file for deploying the code, breaking a VM and swapping blue to green.
targetScope = 'resourceGroup'

param location string = resourceGroup().location
@description('The healer\'s name prefix (main.bicep `name`).')
param name string = 'vmsshealer'
param adminUsername string = 'azureuser'
param sshPublicKey string
param capacity int = 3
param vmSize string = 'Standard_B2s'

// Blue serves at `capacity`; green waits at zero for `handler swap`.
var colors = ['blue', 'green']

// main.bicep names its topic deterministically; the VMs need its endpoint in their custom data
// before the topic exists (the agent retries until it does).
var suffix = uniqueString(resourceGroup().id, name)
var topicEndpoint = 'https://${name}-heartbeats-${suffix}.${location}-1.eventgrid.azure.net/api/events'

// The agent's files, written by cloud-init on every sample VM.
var agentFiles = [
  '  - path: /opt/vmss-healer/vmss-healer-agent'
  '    encoding: b64'
  '    permissions: "0755"'
  '    content: ${base64(loadTextContent('../agent/vmss-healer-agent'))}'
  '  - path: /opt/vmss-healer/vmss-healer-agent.service'
  '    encoding: b64'
  '    content: ${base64(loadTextContent('../agent/vmss-healer-agent.service'))}'
  '  - path: /opt/vmss-healer/install.sh'
  '    encoding: b64'
  '    permissions: "0755"'
  '    content: ${base64(loadTextContent('../agent/install.sh'))}'
]

var cloudInit = join(concat([
  '#cloud-config'
  'write_files:'
], agentFiles, [
  '  - path: /srv/sample/healthz'
  '    content: ok'
  '  - path: /etc/systemd/system/sample-app.service'
  '    content: |'
  '      [Unit]'
  '      Description=vmss-healer sample app: serves /healthz on port 8080 (the load balancer probes it)'
  '      [Service]'
  '      ExecStartPre=/bin/sh -c "echo ok > /srv/sample/healthz"'
  '      ExecStart=/usr/bin/python3 -m http.server 8080 --directory /srv/sample'
  '      Restart=always'
  '      [Install]'
  '      WantedBy=multi-user.target'
  'runcmd:'
  '  - systemctl daemon-reload'
  '  - systemctl enable --now sample-app.service'
  // Before the platform terminates (or reboots, redeploys) a VM, its agent drains it: /healthz
  // goes, the load balancer's probe on it fails and new requests go elsewhere, then the event is
  // approved. The app puts the file back when it starts again (ExecStartPre).
  '  - bash /opt/vmss-healer/install.sh --topic ${topicEndpoint} --health-url http://127.0.0.1:8080/healthz --drain-command "rm -f /srv/sample/healthz"'
]), '\n')

// The stateful VM (issue 18): its data lives on a managed disk at LUN 0 that the healer carries
// to a replacement. A unit waits for the disk (attached after boot: by hand the first time, by
// the healer on a new VM), makes a file system only on a blank disk, and mounts it on /data; the
// agent says STARTING until then (--require-mount), so the VM counts only with its data.
var dbCloudInit = join(concat([
  '#cloud-config'
  'write_files:'
], agentFiles, [
  '  - path: /usr/local/bin/sample-mount-data'
  '    permissions: "0755"'
  '    content: |'
  '      #!/bin/sh'
  '      dev=/dev/disk/azure/scsi1/lun0'
  '      while [ ! -e "$dev" ]; do sleep 5; done'
  '      blkid "$dev" >/dev/null 2>&1 || mkfs.ext4 -q "$dev"'
  '      mkdir -p /data && mountpoint -q /data || mount "$dev" /data'
  '  - path: /etc/systemd/system/sample-mount-data.service'
  '    content: |'
  '      [Unit]'
  '      Description=vmss-healer sample: mount the stateful data disk (LUN 0) on /data once attached'
  '      [Service]'
  '      Type=oneshot'
  '      RemainAfterExit=yes'
  '      ExecStart=/usr/local/bin/sample-mount-data'
  '      [Install]'
  '      WantedBy=multi-user.target'
  'runcmd:'
  '  - systemctl daemon-reload'
  '  - systemctl enable --now --no-block sample-mount-data.service'
  '  - bash /opt/vmss-healer/install.sh --topic ${topicEndpoint} --require-mount /data'
]), '\n')

// A Standard load balancer and its public address are closed to inbound traffic unless a
// network security group opens it: the app's port, from the Internet (the probe comes from
// AzureLoadBalancer, which the default rules allow).
resource nsg 'Microsoft.Network/networkSecurityGroups@2024-01-01' = {
  name: '${name}-sample-nsg'
  location: location
  properties: {
    securityRules: [
      {
        name: 'app'
        properties: {
          priority: 100
          direction: 'Inbound'
          access: 'Allow'
          protocol: 'Tcp'
          sourceAddressPrefix: 'Internet'
          sourcePortRange: '*'
          destinationAddressPrefix: '*'
          destinationPortRange: '8080'
        }
      }
    ]
  }
}

resource vnet 'Microsoft.Network/virtualNetworks@2024-01-01' = {
  name: '${name}-sample-vnet'
  location: location
  properties: {
    addressSpace: { addressPrefixes: ['10.42.0.0/16'] }
    subnets: [
      {
        name: 'vms'
        properties: {
          addressPrefix: '10.42.0.0/24'
          networkSecurityGroup: { id: nsg.id }
        }
      }
    ]
  }
}

resource address 'Microsoft.Network/publicIPAddresses@2024-01-01' = {
  name: '${name}-sample-ip'
  location: location
  sku: { name: 'Standard' }
  properties: { publicIPAllocationMethod: 'Static' }
}

var lbName = '${name}-sample-lb'

// Both sets are in one backend pool: during a swap both serve, and what the probe sees failing
// (a draining VM's /healthz gone, or an app that is down) gets no new requests.
resource lb 'Microsoft.Network/loadBalancers@2024-01-01' = {
  name: lbName
  location: location
  sku: { name: 'Standard', tier: 'Regional' }
  properties: {
    frontendIPConfigurations: [
      { name: 'front', properties: { publicIPAddress: { id: address.id } } }
    ]
    backendAddressPools: [{ name: 'app' }]
    probes: [
      {
        name: 'healthz'
        properties: {
          protocol: 'Http'
          port: 8080
          requestPath: '/healthz'
          intervalInSeconds: 5
          probeThreshold: 2
        }
      }
    ]
    loadBalancingRules: [
      {
        name: 'http'
        properties: {
          protocol: 'Tcp'
          frontendPort: 80
          backendPort: 8080
          frontendIPConfiguration: { id: resourceId('Microsoft.Network/loadBalancers/frontendIPConfigurations', lbName, 'front') }
          backendAddressPool: { id: resourceId('Microsoft.Network/loadBalancers/backendAddressPools', lbName, 'app') }
          probe: { id: resourceId('Microsoft.Network/loadBalancers/probes', lbName, 'healthz') }
          disableOutboundSnat: true
        }
      }
    ]
    // The VMs reach the heartbeat topic and the package mirrors through the load balancer's
    // address: a backend pool member gets no default outbound access.
    outboundRules: [
      {
        name: 'out'
        properties: {
          protocol: 'All'
          frontendIPConfigurations: [
            { id: resourceId('Microsoft.Network/loadBalancers/frontendIPConfigurations', lbName, 'front') }
          ]
          backendAddressPool: { id: resourceId('Microsoft.Network/loadBalancers/backendAddressPools', lbName, 'app') }
        }
      }
    ]
  }
}

resource scaleSets 'Microsoft.Compute/virtualMachineScaleSets@2024-07-01' = [for (color, i) in colors: {
  name: '${name}-sample-${color}'
  location: location
  sku: { name: vmSize, tier: 'Standard', capacity: i == 0 ? capacity : 0 }
  identity: { type: 'SystemAssigned' }
  properties: {
    orchestrationMode: 'Uniform'
    upgradePolicy: { mode: 'Manual' }
    overprovision: false
    virtualMachineProfile: {
      // Terminate notifications: a deleted instance gets five minutes' notice as a scheduled event,
      // which its agent drains for and approves ("Terminate notification for Azure Virtual Machine
      // Scale Set instances": notBeforeTimeout PT5M to PT15M). The healer's delete steps time out
      // only after this window.
      scheduledEventsProfile: {
        terminateNotificationProfile: { enable: true, notBeforeTimeout: 'PT5M' }
      }
      osProfile: {
        computerNamePrefix: color
        adminUsername: adminUsername
        customData: base64(cloudInit)
        linuxConfiguration: {
          disablePasswordAuthentication: true
          ssh: {
            publicKeys: [
              { path: '/home/${adminUsername}/.ssh/authorized_keys', keyData: sshPublicKey }
            ]
          }
        }
      }
      storageProfile: {
        osDisk: { createOption: 'FromImage', managedDisk: { storageAccountType: 'Standard_LRS' } }
        imageReference: {
          publisher: 'Canonical'
          offer: '0001-com-ubuntu-server-jammy'
          sku: '22_04-lts-gen2'
          version: 'latest'
        }
      }
      networkProfile: {
        networkInterfaceConfigurations: [
          {
            name: 'nic'
            properties: {
              primary: true
              ipConfigurations: [
                {
                  name: 'ip'
                  properties: {
                    subnet: { id: vnet.properties.subnets[0].id }
                    loadBalancerBackendAddressPools: [{ id: lb.properties.backendAddressPools[0].id }]
                  }
                }
              ]
            }
          }
        ]
      }
    }
  }
}]

// The stateful set: one VM in one zone, its data on a disk of that zone. Attach the disk to the
// first VM once (README: `az vmss disk attach`); from then on its slot carries it.
@description('The zone of the stateful VM and its data disk.')
param statefulZone string = '1'

resource dbData 'Microsoft.Compute/disks@2024-03-02' = {
  name: '${name}-sample-db-data'
  location: location
  zones: [statefulZone]
  sku: { name: 'StandardSSD_LRS' }
  properties: {
    creationData: { createOption: 'Empty' }
    diskSizeGB: 32
  }
}

resource db 'Microsoft.Compute/virtualMachineScaleSets@2024-07-01' = {
  name: '${name}-sample-db'
  location: location
  zones: [statefulZone]
  sku: { name: vmSize, tier: 'Standard', capacity: 1 }
  identity: { type: 'SystemAssigned' }
  properties: {
    orchestrationMode: 'Uniform'
    upgradePolicy: { mode: 'Manual' }
    overprovision: false
    virtualMachineProfile: {
      osProfile: {
        computerNamePrefix: 'db'
        adminUsername: adminUsername
        customData: base64(dbCloudInit)
        linuxConfiguration: {
          disablePasswordAuthentication: true
          ssh: {
            publicKeys: [
              { path: '/home/${adminUsername}/.ssh/authorized_keys', keyData: sshPublicKey }
            ]
          }
        }
      }
      // No data disk in the model: the slot's disk is attached to each VM, not made with it.
      storageProfile: {
        osDisk: { createOption: 'FromImage', managedDisk: { storageAccountType: 'Standard_LRS' } }
        imageReference: {
          publisher: 'Canonical'
          offer: '0001-com-ubuntu-server-jammy'
          sku: '22_04-lts-gen2'
          version: 'latest'
        }
      }
      networkProfile: {
        networkInterfaceConfigurations: [
          {
            name: 'nic'
            properties: {
              primary: true
              ipConfigurations: [{ name: 'ip', properties: { subnet: { id: vnet.properties.subnets[0].id } } }]
            }
          }
        ]
      }
    }
  }
}

// Blue's autoscale: CPU-driven between 2 and 6 instances. `handler swap` gives green a setting
// with these profiles and disables this one (a setting's target cannot change).
resource blueAutoscale 'Microsoft.Insights/autoscalesettings@2022-10-01' = {
  name: '${name}-sample-blue-autoscale'
  location: location
  properties: {
    enabled: true
    targetResourceUri: scaleSets[0].id
    profiles: [
      {
        name: 'cpu'
        capacity: { minimum: '2', maximum: '6', default: string(capacity) }
        rules: [
          {
            metricTrigger: {
              metricName: 'Percentage CPU'
              metricResourceUri: scaleSets[0].id
              timeGrain: 'PT1M'
              statistic: 'Average'
              timeWindow: 'PT5M'
              timeAggregation: 'Average'
              operator: 'GreaterThan'
              threshold: 70
            }
            scaleAction: { direction: 'Increase', type: 'ChangeCount', value: '1', cooldown: 'PT5M' }
          }
          {
            metricTrigger: {
              metricName: 'Percentage CPU'
              metricResourceUri: scaleSets[0].id
              timeGrain: 'PT1M'
              statistic: 'Average'
              timeWindow: 'PT10M'
              timeAggregation: 'Average'
              operator: 'LessThan'
              threshold: 20
            }
            scaleAction: { direction: 'Decrease', type: 'ChangeCount', value: '1', cooldown: 'PT10M' }
          }
        ]
      }
    ]
  }
}

// (For-expressions are values of their own, not function arguments: named first.)
var colorSets = [for (color, i) in colors: { id: scaleSets[i].id, overrides: '' }]
var colorPrincipals = [for (color, i) in colors: scaleSets[i].identity.principalId]

// The healer, watching the three scale sets; the VMs' identities may publish heartbeats; swaps
// allowed; the stateful set's disks may be moved (its STATEFUL_ override grants that role).
module healer '../main.bicep' = {
  name: 'vmss-healer'
  params: {
    name: name
    location: location
    // The stateful set of one: its disk at LUN 0 follows it; 40 % of one VM is none, so the
    // short-circuit is lifted for it (the fleet-wide pipeline-fault brake still holds).
    watchedScaleSets: concat(colorSets, [
      { id: db.id, overrides: 'STATEFUL_DISKS=0 MAX_UNHEALTHY=100%' }
    ])
    senderPrincipalIds: concat(colorPrincipals, [db.identity.principalId])
    enableSwap: true
    // The sample heals for real; a production first run starts in dry run.
    dryRun: false
  }
}

output SCALE_SET_ID string = scaleSets[0].id
output GREEN_SCALE_SET_ID string = scaleSets[1].id
output DB_SCALE_SET_ID string = db.id
output DB_DATA_DISK_ID string = dbData.id
output APP_URL string = 'http://${address.properties.ipAddress}/healthz'
// Everything infra/hooks/postdeploy.sh reads from azd's environment (tests/infra.rs checks it):
// without them `azd up` of the sample would subscribe nothing, and the healer would run on a
// silent fleet.
output FUNCTION_APP_NAME string = healer.outputs.FUNCTION_APP_NAME
output HEARTBEAT_TOPIC_ENDPOINT string = healer.outputs.HEARTBEAT_TOPIC_ENDPOINT
output HEARTBEAT_TOPIC_NAME string = healer.outputs.HEARTBEAT_TOPIC_NAME
output STORAGE_ACCOUNT_NAME string = healer.outputs.STORAGE_ACCOUNT_NAME
output SYSTEM_TOPICS array = healer.outputs.SYSTEM_TOPICS
