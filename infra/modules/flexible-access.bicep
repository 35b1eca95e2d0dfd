// Grants the healer's Flexible VM role on this resource group when the watched scale set in it is
// in Flexible orchestration: its instances are virtual machines of the group, listed and acted on
// at the group (src/edges/compute.rs FLEXIBLE_GROUP_ACTIONS). A Uniform set's group gets nothing.
param orchestrationMode string
param roleDefinitionId string
param principalId string

resource access 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (toLower(orchestrationMode) == 'flexible') {
  name: guid(resourceGroup().id, principalId, roleDefinitionId)
  properties: {
    roleDefinitionId: roleDefinitionId
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}
